"""Saving a pruned model in Hugging Face format, with a model card that says how it was made.

The card (README.md) is built with huggingface_hub's `ModelCard` / `ModelCardData` / `EvalResult`, so the
hub reads it as it reads its own: licence, languages, datasets, base model, tags, and every metric the
trial measured as a `model-index` entry. The licence is the base model's, read from the base model's own
card or, for the offline GGUF-built models (engine.pretrained.build), from their provenance.json.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from engine.data.sources import TextSourceConfig
from engine.io import temporary_sibling
from engine.languages import LANGUAGES, get_language
from engine.pretrained.build import PROVENANCE

# Licence ids the hub accepts in `license:` (a subset of https://huggingface.co/docs/hub/repositories-licenses:
# the ones base models here are likely to carry). Any other licence is written as the hub asks for one it
# does not list: `license: other` with `license_name` (a slug) and `license_link`.
HUB_LICENCES = frozenset({
    "apache-2.0", "mit", "gemma", "llama2", "llama3", "llama3.1", "llama3.2", "llama3.3", "llama4",
    "cc-by-4.0", "cc-by-sa-4.0", "cc-by-nc-4.0", "cc-by-nc-sa-4.0", "cc-by-nd-4.0", "cc-by-nc-nd-4.0", "cc0-1.0",
    "bsd-2-clause", "bsd-3-clause", "gpl-3.0", "agpl-3.0", "lgpl-3.0", "mpl-2.0", "unlicense", "openrail",
    "bigscience-openrail-m", "bigscience-bloom-rail-1.0", "bigcode-openrail-m", "creativeml-openrail-m",
    "other",
})
# How a licence is spelt in provenance.json (engine.pretrained.catalog) or by people, lower-cased -> hub id.
LICENCE_ALIASES = {
    "gemma terms of use": "gemma",
    "apache 2.0": "apache-2.0",
    "apache license 2.0": "apache-2.0",
    "apache license, version 2.0": "apache-2.0",
    "mit license": "mit",
}
HUB_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
TAGS = ("pruned", "calibration-sweep")


@dataclass(frozen=True)
class Licence:
    """The base model's licence as the hub spells it: a hub licence id, or `other` with a name and link."""

    id: str
    name: str | None = None  # with `other`: the licence's slug (license_name)
    link: str | None = None  # with `other`: where to read it (license_link)
    source: str = ""  # where it was read, for the card's body


@dataclass(frozen=True)
class CardMetric:
    """One number the trial measured: (language, task, metric) -> value, and the text it was measured on."""

    language: str
    task: str  # "perplexity" or an lm-eval task name
    metric: str
    value: float
    dataset: str | None = None  # the hub dataset the text came from; None for local text or an lm-eval task
    dataset_config: str | None = None
    dataset_split: str | None = None
    dataset_revision: str | None = None


@dataclass(frozen=True)
class CardCalibration:
    weights: tuple[tuple[str, float], ...]  # (ISO 639-1 code, weight), weights summing to 1
    samples: int
    seq_len: int
    seed: int
    sampling: str
    dataset: str | None = None  # the hub dataset the windows came from; None for local text

    @property
    def label(self) -> str:
        """'sw' for one language, 'en:0.5+sw:0.5' for a mix (as trial.json has always written it)."""
        return "+".join(f"{code}:{weight:g}" if len(self.weights) > 1 else code for code, weight in self.weights)


@dataclass(frozen=True)
class CardInputs:
    """What a pruned model's card says, gathered by engine.trial._save_model."""

    name: str  # the trial's readable name
    key: str  # the trial key
    base: str  # the base model as loaded: a hub id or a local directory
    method: str
    sparsity: str
    evaluation_languages: tuple[str, ...]
    metrics: tuple[CardMetric, ...] = ()
    calibration: CardCalibration | None = None  # None: a method that reads no text (magnitude)
    base_revision: str | None = None
    base_hub_id: str | None = None  # a local base's origin on the hub, when it names one (provenance.json)
    licence: Licence | None = None
    datasets: tuple[str, ...] = ()  # hub datasets read for calibration and evaluation


@dataclass(frozen=True)
class PruningFields:
    """The card data's `pruning:` mapping: how the model was made, as fields a program can read back."""

    method: str
    sparsity: str
    trial_key: str
    trial_name: str
    calibration_languages: list[str] | None = None
    calibration_mix: str | None = None
    calibration_samples: int | None = None
    calibration_seq_len: int | None = None
    calibration_sampling: str | None = None
    seed: int | None = None
    base_model_revision: str | None = None
    base_model_hub_id: str | None = None


# -- the base model's licence -------------------------------------------------------------------------------
def hub_licence(name: str, link: str | None = None, source: str = "") -> Licence:
    """A licence named in words (provenance.json's `licence`) as the hub spells it."""
    lowered = name.strip().lower()
    hub_id = LICENCE_ALIASES.get(lowered, lowered)
    if hub_id in HUB_LICENCES and hub_id != "other":
        return Licence(hub_id, source=source)
    slug = re.sub(r"[^a-z0-9.]+", "-", lowered).strip("-") or "custom"
    return Licence("other", name=slug, link=link, source=source)


def _card_licence(path: Path, source: str) -> Licence | None:
    from huggingface_hub import ModelCard

    try:
        data = ModelCard.load(path, ignore_metadata_errors=True).data
    except (OSError, ValueError):  # unreadable or no metadata block: the card is silent about the licence
        return None
    licence = data.get("license")
    if not isinstance(licence, str) or not licence.strip():
        return None
    return Licence(licence.strip(), name=data.get("license_name"), link=data.get("license_link"), source=source)


def _provenance(directory: Path) -> dict:
    try:
        data = json.loads((directory / PROVENANCE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def local_hub_id(directory: Path) -> str | None:
    """The hub repository a local model directory was built from, when its provenance.json names one
    (`upstream: "google/gemma-3-270m (GGUF: ...)"`: the first word, if it is an owner/name id)."""
    upstream = _provenance(Path(directory)).get("upstream")
    first = upstream.split()[0] if isinstance(upstream, str) and upstream.split() else ""
    return first if HUB_REPO_ID.match(first) else None


def base_licence(name_or_path: str, revision: str | None = None) -> Licence | None:
    """The base model's licence: from its own card (README.md front matter) or, for a local directory
    without one, from provenance.json. A hub id's card comes through the hub cache (downloaded if not
    there); an unreachable hub, a gated repository or a card without a licence give None, never an error:
    the trial has already run, and its card then says the licence is unknown."""
    directory = Path(name_or_path)
    if directory.is_dir():
        licence = _card_licence(directory / "README.md", "the base model's README.md") \
            if (directory / "README.md").is_file() else None
        if licence is not None:
            return licence
        provenance = _provenance(directory)
        if isinstance(provenance.get("licence"), str) and provenance["licence"].strip():
            link = provenance.get("licence_url") if isinstance(provenance.get("licence_url"), str) else None
            return hub_licence(provenance["licence"], link, f"the base model's {PROVENANCE}")
        return None
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    source = f"the card of {name_or_path} on the hub"
    try:
        # The cache first: a worker that loaded the model offline may hold the card already (and an unreachable
        # hub costs hf_hub_download its retries, some 20 s, before it gives up).
        cached = try_to_load_from_cache(name_or_path, "README.md", revision=revision)
        if isinstance(cached, str):
            return _card_licence(Path(cached), source)
        path = hf_hub_download(name_or_path, "README.md", revision=revision)
    except Exception:  # offline, unreachable, gated, no card, any hub error: the licence is unknown, not fatal
        return None
    return _card_licence(Path(path), source)


# -- the card -------------------------------------------------------------------------------------------------
def _language_codes(inputs: CardInputs) -> list[str]:
    """Calibration, evaluation and task languages, each once, as ISO codes (the registry's are ISO 639-1)."""
    codes: list[str] = []
    calibration = [code for code, _ in inputs.calibration.weights] if inputs.calibration else []
    for code in (*calibration, *inputs.evaluation_languages, *(m.language for m in inputs.metrics)):
        if code and code not in codes:
            codes.append(code)
    return codes


def _language_name(code: str) -> str:
    language = LANGUAGES.get(code)
    return language.name if language else code


def eval_results(inputs: CardInputs) -> list:
    """One `EvalResult` per (language, task, metric) measured. Each language's text gets its own dataset
    config (its name, or the language code for local text), since the model-index groups results by
    (task, dataset type, config, split, revision) and would otherwise fold languages together."""
    from huggingface_hub import EvalResult

    results = []
    for m in inputs.metrics:
        if m.task == "perplexity":
            dataset_type = m.dataset or "local-text"
            where = m.dataset or "local text"
            split = f", split {m.dataset_split}" if m.dataset_split else ""
            dataset_name = f"{where} ({_language_name(m.language)}{split})"
            config = m.dataset_config or m.language
            task_name = f"Perplexity ({_language_name(m.language)})"
        else:  # an lm-eval task: its name is the benchmark's id (the hub dataset behind it is lm-eval's)
            dataset_type = m.task
            dataset_name = f"{m.task} (lm-eval, {_language_name(m.language)})"
            config = m.dataset_config
            task_name = m.task
        results.append(EvalResult(
            task_type="text-generation", task_name=task_name, dataset_type=dataset_type, dataset_name=dataset_name,
            dataset_config=config, dataset_split=m.dataset_split, dataset_revision=m.dataset_revision,
            metric_type=m.metric, metric_value=m.value, metric_name=f"{m.metric} ({m.language})"))
    return results


def card_metrics(rows: Iterable[dict], perplexity_source: TextSourceConfig | None) -> tuple[CardMetric, ...]:
    """The trial's finite numeric metric rows (engine.trial's) for the card, each with the text it was
    measured on: perplexity with the evaluation source (its hub dataset, config and split per language)."""
    out = []
    for row in rows:
        value = row.get("value")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue  # the model-index holds numbers only
        source = perplexity_source if row.get("task") == "perplexity" else None
        hub = source is not None and source.kind == "hub"
        out.append(CardMetric(
            language=row["language"], task=row["task"], metric=row["metric"], value=float(value),
            dataset=source.dataset if hub else None,
            dataset_config=source.config_for(get_language(row["language"])) if hub else None,
            dataset_split=source.split if source is not None else None,
            dataset_revision=source.revision if hub else None))
    return tuple(out)


def pruning_fields(inputs: CardInputs) -> PruningFields:
    cal = inputs.calibration
    return PruningFields(
        method=inputs.method, sparsity=inputs.sparsity, trial_key=inputs.key, trial_name=inputs.name,
        calibration_languages=[code for code, _ in cal.weights] if cal else None,
        calibration_mix=cal.label if cal else None, calibration_samples=cal.samples if cal else None,
        calibration_seq_len=cal.seq_len if cal else None, calibration_sampling=cal.sampling if cal else None,
        seed=cal.seed if cal else None, base_model_revision=inputs.base_revision,
        base_model_hub_id=inputs.base_hub_id)


def card_data(inputs: CardInputs):
    """The card's metadata block (huggingface_hub.ModelCardData)."""
    from huggingface_hub import ModelCardData

    licence = inputs.licence
    results = eval_results(inputs)
    pruning = {k: v for k, v in asdict(pruning_fields(inputs)).items() if v is not None}
    # `base_model_relation` is left out: the hub's relations are adapter, merge, quantized and finetune, and a
    # pruned model is none of them (no training, the same dtype). Saying nothing claims nothing; the hub may
    # still show its own guess.
    return ModelCardData(
        base_model=inputs.base, license=licence.id if licence else None,
        license_name=licence.name if licence else None, license_link=licence.link if licence else None,
        language=_language_codes(inputs) or None, datasets=list(inputs.datasets) or None,
        library_name="transformers", pipeline_tag="text-generation",
        tags=[TAGS[0], inputs.method, *TAGS[1:]], model_name=inputs.name if results else None,
        eval_results=results or None, pruning=pruning)


def _body(inputs: CardInputs) -> str:
    cal = inputs.calibration
    if cal is not None:
        source = f" from `{cal.dataset}`" if cal.dataset else ""
        how = (f"calibrated on\n**{cal.label}** text ({cal.samples} windows of {cal.seq_len} tokens, seed {cal.seed}) "
               f"drawn by {cal.sampling} sampling{source}")
    else:
        how = "with no calibration text (the method reads none)"
    licence = inputs.licence
    if licence is None:
        licence_line = ("The base model's licence could not be read (its card names none, or could not be had); "
                        "check it before sharing this model, which is bound by it.")
    else:
        spelt = licence.id if licence.id != "other" else f"{licence.name} ({licence.link or 'no link given'})"
        licence_line = f"Licence: the base model's, `{spelt}`, as read from {licence.source or 'its card'}."
    origin = f" The base model was built from the hub's `{inputs.base_hub_id}`." if inputs.base_hub_id else ""
    rows = "\n".join(f"| {m.language} | {m.task} | {m.metric} | {m.value:.6g} |" for m in inputs.metrics)
    fields = "\n".join(f"- {name}: `{', '.join(value) if isinstance(value, list) else value}`"
                       for name, value in asdict(pruning_fields(inputs)).items() if value is not None)
    return f"""
# {inputs.name}

`{inputs.base}` pruned with **{inputs.method}** to sparsity **{inputs.sparsity}** of its decoder linear layers, {how}, by
the calibration-sweep project (trial key `{inputs.key}`).{origin}

The pruned weights are stored as dense tensors with zeros where weights were removed; the model loads with
`AutoModelForCausalLM.from_pretrained` like the base model. {licence_line}

## Pruning

{fields}

## Evaluation (as measured in the sweep)

| language | task | metric | value |
|---|---|---|---|
{rows}
"""


def model_card(inputs: CardInputs) -> str:
    """The card's text (README.md): metadata through huggingface_hub, read back by `ModelCard` before it is
    returned, so a card the hub's parser would refuse never reaches the disk."""
    from huggingface_hub import ModelCard

    for m in inputs.metrics:
        if not math.isfinite(m.value):
            raise ValueError(f"{m.language} {m.task} {m.metric} is {m.value}; a model-index value must be finite")
    text = f"---\n{card_data(inputs).to_yaml()}\n---\n{_body(inputs)}"
    return str(ModelCard(text))


def save_pruned_model(model, tokenizer, directory: Path, card: str, details: dict) -> Path:
    """Writes the model, its tokenizer, README.md (the card) and trial.json into `directory`, whole or not
    at all: everything goes to a temporary sibling first, which is then renamed."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_sibling(directory)
    model.save_pretrained(temporary)
    tokenizer.save_pretrained(temporary)
    (temporary / "README.md").write_text(card, encoding="utf-8")
    (temporary / "trial.json").write_text(json.dumps(details, indent=1, default=str) + "\n", encoding="utf-8")
    # safetensors writes its files with mode 0600 whatever the umask, so on a shared study directory
    # nobody but the sweep's own user could load the weights (with lm_eval or anything else). Give every
    # file the mode an ordinary write would: the umask's, read off the directory save_pretrained made.
    readable = temporary.stat().st_mode & 0o666
    for path in temporary.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(readable)
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(temporary, directory)
    return directory
