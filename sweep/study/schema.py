"""The study file: a typed schema (pydantic) for its structure, then cross-field rules in `checks`.

Every model here forbids unknown keys, so a typo is an error rather than a silently ignored default.
"""
from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    field_validator,
    model_validator,
)

from engine.prune.sparsity import Sparsity, parse_sparsity

SLUG = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)


class ModelSpec(Strict):
    """A causal LM, by hub id (`hub`) or local directory (`path`, relative to the study file)."""

    name: StrictStr | None = Field(None, description="short label used in trial names; derived if absent")
    hub: StrictStr | None = Field(None, description="Hugging Face hub id, `org/name`; give `hub` or `path`")
    path: StrictStr | None = Field(
        None, description="a local model directory, relative to the study file; `$VARS` expand")
    revision: StrictStr | None = Field(None, description="hub commit, branch or tag; pin a commit for reproducibility")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "bfloat16", description="weights and activations while pruning and evaluating")
    gpus: StrictInt = Field(1, ge=0, le=64, description="GPUs per model replica; 0 runs on CPU")
    accelerator_type: StrictStr | None = Field(
        None, description="Ray accelerator type the model's actors must run on (H100, A100-80G, A10G, L4, ...): "
                          "keeps a large model off nodes whose GPUs are too small")
    max_seq_len: StrictInt = Field(
        2048, gt=0, le=1_048_576, description="longest sequence the model takes; calibration and perplexity "
                                              "windows must fit")
    trust_remote_code: StrictBool = Field(
        False, description="allow a model whose config names its own code (`auto_map`); refused otherwise")

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        source = (self.hub or self.path or "model").rstrip("/")
        return re.sub(r"[^a-z0-9._-]+", "-", source.split("/")[-1].lower()).strip("-") or "model"


class TextSource(Strict):
    """Where text comes from: the hub (`kind: hub`) or local files (`kind: local`).

    hub: `dataset` with `config` (a template: `{mc4}`, `{flores}` or `{lang}` become the language's code
    in that source), `split`, `revision`, `text_field`.
    local: `path` is a directory holding, per language, `<lang>/` (all .jsonl/.txt/.parquet files
    inside, or only those named `<split>.*` when `split` is set) or a file `<lang>.jsonl|.txt|.parquet`.
    """

    kind: Literal["hub", "local"] = Field(..., description="`hub`: a dataset on the hub; `local`: files")
    dataset: StrictStr | None = Field(None, description="hub: the dataset id, such as `allenai/c4`")
    config: StrictStr | None = Field(
        None, description="hub: the dataset config, a template: `{mc4}`, `{flores}` or `{lang}` become the "
                          "language's code in that scheme")
    revision: StrictStr | None = Field(None, description="hub: the dataset commit; pin it for reproducibility")
    split: StrictStr | None = Field(
        None, description="hub: the split; local: only files named `<split>.*` in each language folder")
    text_field: StrictStr = Field("text", description="the column (or JSON key) holding the text")
    path: StrictStr | None = Field(
        None, description="local: a folder with `<lang>/` folders or `<lang>.jsonl|.txt|.parquet` files")


class MixSpec(Strict):
    mix: dict[StrictStr, StrictInt | StrictFloat] = Field(
        ..., description="language -> weight; weights are normalised to sum to 1")


LanguageChoice = StrictStr | MixSpec


class CalibrationSpec(Strict):
    source: TextSource = Field(..., description="where calibration text comes from")
    languages: list[LanguageChoice] = Field(
        ..., min_length=1, description="ISO 639-1 codes, or mixes: `en+de` (equal), `en:3+de:1`, `{mix: {en: 0.75, "
                                       "de: 0.25}}`; one trial per entry")
    samples: StrictInt = Field(128, gt=0, le=1_000_000, description="calibration windows per trial")
    seq_len: StrictInt = Field(2048, gt=0, le=1_048_576, description="tokens per calibration window")
    seeds: list[StrictInt] = Field(
        default_factory=lambda: [0], min_length=1, description="one trial per seed; the seed orders the documents")
    sampling: Literal["published", "packed"] = Field(
        "packed", description="`published`: as the Wanda and SparseGPT C4 loaders, each window one random "
                              "stretch inside its own random document longer than seq_len (too few such "
                              "documents is an error); `packed`: documents joined at pretraining document "
                              "boundaries and cut into consecutive windows")
    separator: StrictStr | None = Field(
        None, description="packed: the token that separated documents in pretraining (Llama 3: its "
                          "end_of_text token); default: chosen from the tokenizer, never a chat end-of-turn token")

    @model_validator(mode="after")
    def _separator_only_when_packed(self) -> CalibrationSpec:
        if self.separator is not None and self.sampling != "packed":
            raise ValueError("`separator` applies only to `sampling: packed`; published windows hold no separator")
        return self


SparsityValue = StrictFloat | StrictInt | StrictStr


class PrunerSpec(Strict):
    method: StrictStr = Field(..., description="`magnitude`, `wanda` or `sparsegpt`")
    name: StrictStr | None = Field(None, description="label in trial names; needed when one method appears twice")
    sparsity: SparsityValue | list[SparsityValue] = Field(
        ..., description="a fraction in (0, 1), `50%`, or N:M (`2:4`: 2 pruned in every 4); a list: one trial each")
    params: dict[StrictStr, Any] = Field(
        default_factory=dict, description="the method's parameters (sparsegpt: `blocksize`, `dampening`, "
                                          "`max_dampening_retries`); unknown ones are refused")
    targets: list[StrictStr] | None = Field(
        None, min_length=1,
        description="regular expressions over linear-layer names inside the decoder blocks; default: all of them")

    @property
    def sparsity_values(self) -> list[SparsityValue]:
        return self.sparsity if isinstance(self.sparsity, list) else [self.sparsity]

    @property
    def sparsities(self) -> list[Sparsity]:
        return [parse_sparsity(v) for v in self.sparsity_values]

    @property
    def label(self) -> str:
        return self.name or self.method


class BaselineSpec(Strict):
    dense: StrictBool = Field(True, description="evaluate each unpruned model once")


class PerplexitySpec(Strict):
    source: TextSource = Field(..., description="where evaluation text comes from")
    window: StrictInt = Field(2048, gt=0, le=1_048_576, description="tokens per non-overlapping window")
    max_tokens: StrictInt | None = Field(None, gt=0, description="evaluation tokens per language; default all")


class TaskSpec(Strict):
    task: StrictStr = Field(..., description="lm-eval task name, or a template such as belebele_{flores}")
    shots: StrictInt = Field(0, ge=0, le=64, description="few-shot examples")
    limit: StrictInt | StrictFloat | None = Field(None, gt=0, description="documents per task (or a fraction)")
    languages: list[StrictStr] | None = Field(None, min_length=1, description="subset of evaluation.languages")


class EvaluationSpec(Strict):
    languages: list[StrictStr] = Field(..., min_length=1, description="target languages")
    perplexity: PerplexitySpec | None = Field(None, description="perplexity and bits per byte per target language")
    tasks: list[TaskSpec] = Field(default_factory=list, description="lm-eval tasks, run on the model in memory")
    include_path: StrictStr | None = Field(
        None, description="a folder of extra lm-eval task YAMLs (offline tasks, your own tasks)")
    batch_size: StrictInt = Field(8, gt=0, description="sequences per forward pass in evaluation")
    task_scorer: Literal["shared_prefix", "lm_eval"] = Field(
        "shared_prefix", description="how lm-eval's loglikelihood requests are computed: `shared_prefix` runs each "
                                     "context once and reuses its KV cache for every answer (lm-eval's numbers, "
                                     "docs/evaluation.md); `lm_eval` uses lm-eval's own HFLM, for comparison")


class LapeSpec(Strict):
    enabled: StrictBool = Field(True, description="language-specific neurons by LAPE (docs/analyses.md)")
    lape_quantile: StrictFloat = Field(
        0.01, gt=0, lt=1, description="Tang et al.'s top_rate: the share of all MLP neurons (all layers) selected "
                                      "by lowest LAPE after the threshold filter")
    activation_quantile: StrictFloat = Field(
        0.95, gt=0, lt=1, description="Tang et al.'s filter_rate and activation_bar_ratio: the threshold is the "
                                      "k-th smallest of all activation probabilities, k = round(count x this)")
    threshold_from: Literal["own", "dense"] = Field(
        "own", description="`own`: each model (dense, each pruned one) its own threshold; `dense`: the dense "
                           "model's for all; the report shows both where they differ")


class SubspaceSpec(Strict):
    enabled: StrictBool = Field(
        True, description="SNR in the language-specific and language-agnostic subspaces (docs/analyses.md)")
    rank: StrictInt | None = Field(
        None, gt=0, description="dimensions r of LSAR's language-specific subspace; default languages - 1")
    token_sample: StrictInt = Field(
        32, ge=0, le=4096, description="evaluation tokens per language whose hidden states every trial keeps, "
                                       "for the per-token SNR (1.75 MiB per token for an 8B model; 0: off)")


class MaskAnalysisSpec(Strict):
    enabled: StrictBool = Field(True, description="mask overlap and layer-wise pruning error (docs/analyses.md)")
    save_masks: StrictBool = Field(
        False, description="keep full bit-packed masks (1 bit per weight: 0.9 GB per trial for an 8B model); "
                           "otherwise each mask is kept at sample_bits fixed positions per matrix")
    sample_bits: StrictInt = Field(2**20, gt=0, le=2**30, description="positions sampled per matrix")
    error_tokens: StrictInt = Field(
        4096, ge=0, le=1_048_576,
        description="held-out tokens per target language on which each layer's pruning error is measured (0: off)")


class SignificanceSpec(Strict):
    """How the report tests its comparisons (docs/results.md): a paired bootstrap over the evaluation's
    tokens and documents, and over seeds."""

    alpha: StrictFloat = Field(0.05, gt=0, lt=0.5, description="two-sided level of every test; intervals at 1 - alpha")
    resamples: StrictInt = Field(2000, ge=200, le=100_000, description="bootstrap replicates")
    seed: StrictInt = Field(0, ge=0, description="seed of the bootstrap draws (the report is reproducible)")


class AnalysesSpec(Strict):
    significance: SignificanceSpec = Field(default_factory=SignificanceSpec,
                                           description="always on: how comparisons are tested")
    masks: MaskAnalysisSpec = Field(default_factory=lambda: MaskAnalysisSpec(enabled=False),
                                    description="off unless given")
    lape: LapeSpec = Field(default_factory=lambda: LapeSpec(enabled=False), description="off unless given")
    subspace: SubspaceSpec = Field(default_factory=lambda: SubspaceSpec(enabled=False), description="off unless given")


REPO_FIELDS = {"study", "model", "pruner", "sparsity", "calibration", "seed", "name", "key"}


class SaveModelsSpec(Strict):
    """Pruned models in Hugging Face format (with a model card), under artifacts/<key>/model."""

    enabled: StrictBool = Field(False, description="save each pruned model under `artifacts/<key>/model`")
    hub_repo: StrictStr | None = Field(
        None, description="the hub repo each is uploaded to by `sweep push` (never by the workers), a template such "
                          "as 'me/{model}-{pruner}-{sparsity}-{calibration}-seed{seed}'; needs HF_TOKEN where "
                          "`sweep push` runs")
    private: StrictBool = Field(True, description="hub repos `sweep push` creates are private (override: --public)")

    @field_validator("hub_repo")
    @classmethod
    def _template(cls, value: str | None) -> str | None:
        if value is None:
            return value
        fields = set(re.findall(r"{(\w*)}", value))
        unknown = fields - REPO_FIELDS
        if unknown:
            raise ValueError(f"unknown field(s) {sorted(unknown)} in {value!r}; use {sorted(REPO_FIELDS)}")
        if value.count("/") != 1:
            raise ValueError(f"{value!r} must be 'owner/name'")
        return value


class ExecutionSpec(Strict):
    output_dir: StrictStr = Field("runs/{study}", description="study directory; {study} is the study name")
    retries: StrictInt = Field(2, ge=0, le=100, description="extra attempts for a failed trial")
    trial_timeout_s: StrictInt | StrictFloat | None = Field(
        None, gt=0, description="an attempt running longer is killed and retried; default: no limit")
    placement_timeout_s: StrictInt | StrictFloat | None = Field(
        900, gt=0, description="fail a model's trials as unschedulable when no node can hold its actor for this long")
    cpus_per_actor: StrictInt | StrictFloat = Field(1, gt=0, description="Ray CPUs (and torch threads) per worker actor")
    max_actors: StrictInt | None = Field(None, gt=0, description="at most this many worker actors; default: as many as fit")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="`auto`: CUDA when the actor has a GPU")


class StudySpec(Strict):
    name: StrictStr = Field(..., description="a slug: lowercase letters, digits, `.`, `_`, `-`; names the study directory")
    description: StrictStr = Field("", description="free text, shown in the report")
    models: list[ModelSpec] = Field(..., min_length=1, description="the models to prune")
    calibration: CalibrationSpec = Field(..., description="calibration text, languages, samples and seeds")
    pruners: list[PrunerSpec] = Field(..., min_length=1, description="methods and their sparsities")
    baselines: BaselineSpec = Field(default_factory=BaselineSpec, description="unpruned models to compare with")
    evaluation: EvaluationSpec = Field(..., description="target languages, perplexity and lm-eval tasks")
    analyses: AnalysesSpec = Field(default_factory=AnalysesSpec, description="mask overlap, LAPE neurons, subspaces")
    save_models: SaveModelsSpec = Field(default_factory=SaveModelsSpec, description="keep or upload pruned models")
    execution: ExecutionSpec = Field(default_factory=ExecutionSpec, description="where results go and how trials run")

    @field_validator("name")
    @classmethod
    def _slug_name(cls, value: str) -> str:
        if not SLUG.match(value):
            raise ValueError(f"{value!r} must be a short slug: lowercase letters, digits, '.', '_' or '-'")
        return value
