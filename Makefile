# Two commands on a fresh machine: `make demo` and `make test`. Both set themselves up.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo test test-fast venv assets handbook browser clean-assets

venv: $(STAMP)

# Rebuilt only when the project's dependencies change.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,demo]'
	@touch $@

# Optional, parallel text for six of the seven demo languages; the demo works without it.
handbook:
	@bash scripts/install_handbook.sh

# Optional: a headless browser for the report test.
browser:
	@bash scripts/install_browser.sh

assets: venv handbook
	$(PY) -m engine.demo.build

demo: assets
	$(VENV)/bin/sweep demo

test: venv handbook browser
	$(PY) -m pytest $(PYTEST_ARGS)

# Skips the tests marked slow (asset builds, model training): for quick local iteration only.
test-fast: venv
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

clean-assets:
	rm -rf .cache/demo
