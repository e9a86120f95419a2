"""Bad study files: each is rejected with exit code 2, one line per problem naming the field, no traceback,
nothing written. Good ones pass."""
from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sweep.cli.main import main
from sweep.study.load import load_study
from tests.conftest import STUDIES, write_study


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_rejected(capsys, path: Path, *expected_fragments: str) -> str:
    before = sorted(p.name for p in path.parent.iterdir())
    code, out, err = run_cli(capsys, "validate", str(path))
    assert code == 2, (out, err)
    assert "Traceback" not in err
    for fragment in expected_fragments:
        assert fragment in err, f"{fragment!r} not in:\n{err}"
    assert sorted(p.name for p in path.parent.iterdir()) == before, "validation must not write anything"
    return err


def test_valid_study_passes(tmp_path, hub_study, capsys):
    code, out, err = run_cli(capsys, "validate", str(write_study(tmp_path, hub_study)))
    assert code == 0, err
    # 2 models x (wanda 2 sparsities x 3 mixes x 2 seeds + sparsegpt 1 x 3 x 2 + magnitude 1) + 2 dense
    assert "40 trials (38 pruned + 2 dense baselines)" in out


def test_shipped_reference_study_is_valid(capsys):
    code, out, err = run_cli(capsys, "validate", str(STUDIES / "kurz2024.yaml"))
    assert code == 0, err
    assert "340 trials" in out


@pytest.mark.parametrize(
    "text, fragments",
    [
        ("name: x\nmodels: [\n", ["malformed YAML"]),
        ("name: x\n  bad indent: 1\n", ["malformed YAML"]),
        ("name: a\nname: b\n", ["duplicate key 'name'"]),
        ("- a\n- b\n", ["is a list"]),
        ("", ["empty file"]),
        ("just words", ["is a str"]),
        ("name: " + "[" * 40 + "]" * 40 + "\n", ["nesting deeper than 32 levels"]),
        ("name: " + "[" * 5000 + "\n", ["study.yaml"]),
        ("!!python/object/apply:os.system ['true']\n", ["malformed YAML", "python/object"]),
    ],
    ids=["unclosed", "indent", "duplicate-key", "list", "empty", "scalar", "deep", "very-deep-unclosed", "python-tag"],
)
def test_unreadable_yaml_is_rejected(tmp_path, capsys, text, fragments):
    assert_rejected(capsys, write_study(tmp_path, text), *fragments)


def test_alias_bomb_is_rejected(tmp_path, capsys):
    lines = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    for prev, name in zip("abcdef", "bcdefg"):
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 10) + "]")
    assert_rejected(capsys, write_study(tmp_path, "\n".join(lines) + "\n"), "expands to more than")


def test_huge_file_is_rejected(tmp_path, capsys, hub_study):
    hub_study["description"] = "x" * (2 << 20)
    assert_rejected(capsys, write_study(tmp_path, hub_study), "over the 1024 KiB limit")


def test_missing_and_binary_files(tmp_path, capsys):
    assert_rejected(capsys, tmp_path / "absent.yaml", "absent.yaml", "no such file")
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"name: \xff\xfe\x00")
    assert_rejected(capsys, binary, "bin.yaml", "not UTF-8")


def mutate(study: dict, dotted: str, value) -> dict:
    study = copy.deepcopy(study)
    *parents, last = dotted.split(".")
    node = study
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if value is DELETE:
        del node[last]
    elif isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return study


DELETE = object()

BAD_FIELDS = [
    # unknown keys: a typo must never be ignored
    ("calibration.seedz", [1], "calibration.seedz: unknown key (did you mean 'seeds'?)"),
    ("modelz", [], "modelz: unknown key (did you mean 'models'?)"),
    ("pruners.0.params", {"blocksize": 128}, "pruners[0].params.blocksize: unknown key"),
    ("pruners.1.params", {"blocksize": 64, "percdamp": 0.01}, "pruners[1].params.percdamp: unknown key"),
    # wrong types
    ("calibration.samples", "lots", "calibration.samples: 'lots': input should be a valid integer"),
    ("calibration.samples", 12.5, "calibration.samples: 12.5: input should be a valid integer"),
    ("models.0.gpus", "two", "models[0].gpus: 'two': input should be a valid integer"),
    ("models.0.dtype", "fp8", "models[0].dtype: 'fp8': input should be 'float32', 'bfloat16' or 'float16'"),
    ("models.0.trust_remote_code", "yes", "models[0].trust_remote_code: 'yes': input should be a valid boolean"),
    ("evaluation.languages", "en", "evaluation.languages: 'en': input should be a valid list"),
    ("calibration.languages.1", 3, "calibration.languages[1]: 3 is not allowed; expected a language code"),
    ("name", "My Study!", "name: 'My Study!' must be a short slug"),
    # sparsity outside (0, 1); N:M with N >= M or zero
    ("pruners.1.sparsity", 1.5, "pruners[1].sparsity: 1.5 is not in (0, 1)"),
    ("pruners.1.sparsity", 0, "pruners[1].sparsity: 0 is not in (0, 1)"),
    ("pruners.1.sparsity", 1, "pruners[1].sparsity: 1 is not in (0, 1)"),
    ("pruners.1.sparsity", "150%", "pruners[1].sparsity: 150% is not in (0, 1)"),
    ("pruners.0.sparsity", [0.5, "4:2"], "pruners[0].sparsity[1]: 4:2: N must be smaller than M"),
    ("pruners.0.sparsity", [0.5, "2:2"], "pruners[0].sparsity[1]: 2:2: N must be smaller than M"),
    ("pruners.0.sparsity", ["0:4"], "pruners[0].sparsity[0]: 0:4: N and M of an N:M pattern must both be positive"),
    ("pruners.0.sparsity", ["2:0"], "pruners[0].sparsity[0]: 2:0: N and M"),
    ("pruners.0.sparsity", [0.5, 0.50], "pruners[0].sparsity[1]: 0.5 repeats"),
    ("pruners.0.sparsity", [True], "pruners[0].sparsity[0]: True is not allowed; expected a fraction"),
    # empty axes
    ("models", [], "models: is empty"),
    ("pruners", [], "pruners: is empty"),
    ("calibration.languages", [], "calibration.languages: is empty"),
    ("calibration.seeds", [], "calibration.seeds: is empty"),
    ("evaluation.languages", [], "evaluation.languages: is empty"),
    ("pruners.0.sparsity", [], "pruners[0].sparsity: is empty"),
    # languages
    ("calibration.languages.0", "english", "calibration.languages[0]: unknown language code 'english' (did you mean 'en'?)"),
    ("calibration.languages.0", "xx", "calibration.languages[0]: unknown language code 'xx'"),
    ("calibration.languages.0", "en+en", "calibration.languages[0]: en appears twice in one mix"),
    ("calibration.languages.0", {"mix": {"en": 0, "de": 1}}, "calibration.languages[0]: weight of 'en' must be a positive number"),
    ("calibration.languages.0", "de+en", "calibration.languages[2]: 'de+en' repeats calibration.languages[0]"),
    ("calibration.seeds", [1, 1], "calibration.seeds[1]: 1 repeats calibration.seeds[0]"),
    ("evaluation.languages", ["en", "no"], "evaluation.languages[1]: unknown language code 'no'"),
    # duplicated model / pruner
    ("models.1", {"hub": "org/model-a", "revision": "0123abcd"}, "models[1]: duplicates models[0]"),
    ("pruners.2", {"method": "wanda", "sparsity": 0.6}, "pruners[2]: duplicates pruners[0]"),
    ("pruners.2.method", "wandaa", "pruners[2].method: unknown pruner 'wandaa' (did you mean 'wanda'?)"),
    ("pruners.1.params", {"dampening": 2.0}, "pruners[1].params.dampening: 2.0: input should be less than 1"),
    ("pruners.0.targets", ["("], "pruners[0].targets[0]: '(' is not a regular expression"),
    # model sources
    ("models.0.hub", "not a hub id", "models[0].hub: 'not a hub id' is not a hub id"),
    ("models.0.path", "./weights", "models[0]: give exactly one of hub:"),
    ("calibration.seq_len", 4096, "calibration.seq_len: 4096 exceeds models[0].max_seq_len (2048)"),
    # templates
    ("calibration.source.config", "{mc5}", "calibration.source.config: unknown placeholder {mc5}"),
    ("evaluation.tasks.0.languages", ["ru"], "evaluation.tasks[0].languages[0]: 'ru' is not among evaluation.languages"),
    ("execution", {"output_dir": "runs/{name}"}, "execution.output_dir: unknown placeholder {name}"),
    ("calibration.source", {"kind": "hub"}, "calibration.source.dataset: is required for kind: hub"),
    ("calibration.source", {"kind": "s3"}, "calibration.source.kind: 's3': input should be 'hub' or 'local'"),
]


@pytest.mark.parametrize("field, value, fragment", BAD_FIELDS, ids=[f"{f}={v!r}"[:60] for f, v, _ in BAD_FIELDS])
def test_bad_field_is_named(tmp_path, hub_study, capsys, field, value, fragment):
    assert_rejected(capsys, write_study(tmp_path, mutate(hub_study, field, value)), fragment)


@pytest.mark.parametrize("field", ["name", "models", "calibration", "pruners", "evaluation", "calibration.source",
                                   "pruners.0.method", "pruners.0.sparsity"])
def test_missing_required_field(tmp_path, hub_study, capsys, field):
    shown = field.replace(".0.", "[0].")
    assert_rejected(capsys, write_study(tmp_path, mutate(hub_study, field, DELETE)), f"{shown}: is required but missing")


def test_every_problem_is_reported_at_once(tmp_path, hub_study, capsys):
    study = mutate(hub_study, "calibration.languages", ["en", "klingon", "en"])
    study = mutate(study, "pruners.0.sparsity", [1.5])
    err = assert_rejected(capsys, write_study(tmp_path, study), "calibration.languages[1]", "calibration.languages[2]",
                          "pruners[0].sparsity[0]")
    assert "3 problems" in err


def test_local_sources_must_exist_and_cover_languages(tmp_path, hub_study, capsys):
    corpus = tmp_path / "corpus"
    for lang in ("en", "de"):
        (corpus / lang).mkdir(parents=True)
        (corpus / lang / "calibration.jsonl").write_text('{"text": "hello"}\n')
    (corpus / "sw").mkdir()  # a language folder without text
    study = mutate(hub_study, "calibration.source", {"kind": "local", "path": "corpus", "split": "calibration"})
    study = mutate(study, "calibration.languages", ["en", "de", "sw", "de+sw"])
    assert_rejected(capsys, write_study(tmp_path, study),
                    "calibration.languages[2]: no calibration source: no text for 'sw' for split 'calibration'",
                    "calibration.languages[3]: no calibration source: no text for 'sw'")
    study = mutate(study, "calibration.source.path", "elsewhere")
    assert_rejected(capsys, write_study(tmp_path, study), "calibration.source.path:", "elsewhere is not a directory")


def test_missing_offline_assets_name_the_command_that_builds_them(tmp_path, hub_study, capsys, monkeypatch):
    monkeypatch.setenv("SWEEP_MODELS_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("SWEEP_CORPUS_DIR", str(tmp_path / "corpus-root"))
    study = mutate(hub_study, "models.0", {"path": "${SWEEP_MODELS_DIR}/gemma3-270m"})
    study = mutate(study, "calibration.source", {"kind": "local", "path": "${SWEEP_CORPUS_DIR}/corpus"})
    assert_rejected(capsys, write_study(tmp_path, study),
                    "gemma3-270m does not exist", "built by `make real-models (python -m engine.pretrained.build)`",
                    "corpus is not a directory; the offline assets there are built by `make corpus")


def test_local_model_path_must_exist(tmp_path, hub_study, capsys):
    study = mutate(hub_study, "models.0", {"path": "models/missing"})
    assert_rejected(capsys, write_study(tmp_path, study), "models[0].path:", "models/missing does not exist")
    (tmp_path / "models" / "empty").mkdir(parents=True)
    study = mutate(hub_study, "models.0", {"path": "models/empty"})
    assert_rejected(capsys, write_study(tmp_path, study), "models[0].path:", "has no config.json")


def test_remote_code_is_refused_unless_asked(tmp_path, hub_study, capsys):
    model = tmp_path / "remote"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "x", "auto_map": {"AutoModelForCausalLM": "m.M"}}')
    study = mutate(hub_study, "models.0", {"path": "remote"})
    assert_rejected(capsys, write_study(tmp_path, study), "models[0].trust_remote_code:", "auto_map")
    study = mutate(study, "models.0.trust_remote_code", True)
    code, _, err = run_cli(capsys, "validate", str(write_study(tmp_path, study)))
    assert code == 0, err


def test_yaml_12_scalars(tmp_path, hub_study, capsys):
    """`2:4` unquoted is a sexagesimal 124 and `no` a boolean in YAML 1.1; here they stay what they look like."""
    text = yaml.safe_dump(hub_study, sort_keys=False).replace("- '2:4'", "- 2:4")
    assert "- 2:4" in text
    study = load_study(write_study(tmp_path, text))
    assert [s.canonical() for s in study.spec.pruners[0].sparsities] == ["0.5", "2:4"]


def test_cli_subprocess_exit_codes(tmp_path, hub_study):
    """Through the installed console script: exit 2 with the field named, and no traceback."""
    bad = write_study(tmp_path, mutate(hub_study, "pruners.1.sparsity", 1.5))
    sweep = Path(sys.executable).parent / "sweep"
    result = subprocess.run([str(sweep), "validate", str(bad)], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert "pruners[1].sparsity: 1.5 is not in (0, 1)" in result.stderr
    assert "Traceback" not in result.stderr
    good = write_study(tmp_path, hub_study, "good.yaml")
    result = subprocess.run([str(sweep), "validate", str(good)], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    result = subprocess.run([str(sweep), "frobnicate"], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2


def test_unpinned_hub_revision_warns_but_passes(tmp_path, hub_study, capsys):
    study = mutate(hub_study, "models.0.revision", DELETE)
    code, out, err = run_cli(capsys, "validate", str(write_study(tmp_path, study)))
    assert code == 0
    assert "warning: models[0].revision: org/model-a is not pinned" in err


def test_model_labels_must_be_distinct(tmp_path, hub_study, capsys):
    study = mutate(hub_study, "models.1.name", "m1")
    assert_rejected(capsys, write_study(tmp_path, study), "models[1].name: label 'm1' is already used by models[0]")
    study = mutate(hub_study, "models.1", {"hub": "other/m1", "revision": "x"})  # derived label 'm1' clashes too
    assert_rejected(capsys, write_study(tmp_path, study), "models[1].name: label 'm1' is already used by models[0]")


def test_unknown_lm_eval_task_lists_close_names(tmp_path, hub_study, capsys):
    study = mutate(hub_study, "evaluation.tasks", [{"task": "belebel_{lang}"}])
    assert_rejected(capsys, write_study(tmp_path, study),
                    "evaluation.tasks[0].task: lm-eval has no task 'belebel_en' (from 'belebel_{lang}')",
                    "close names: belebele")
    study = mutate(hub_study, "evaluation.tasks", [{"task": "xnli_{lang}", "languages": ["sw"]}, {"task": "nosuchbench"}])
    assert_rejected(capsys, write_study(tmp_path, study), "evaluation.tasks[1].task: lm-eval has no task 'nosuchbench'")


def test_language_a_benchmark_lacks_is_reported_missing(tmp_path, hub_study, capsys):
    study = mutate(hub_study, "evaluation.tasks", [{"task": "xstorycloze_{lang}"}])  # has en and sw, not de
    code, out, err = run_cli(capsys, "validate", str(write_study(tmp_path, study)))
    assert code == 0, err
    assert "warning: evaluation.tasks[0]: xstorycloze_de does not exist: de is reported as missing" in err
    loaded = load_study(write_study(tmp_path, study, "again.yaml"))
    assert {(r.language, r.name) for r in loaded.tasks} == {("en", "xstorycloze_en"), ("sw", "xstorycloze_sw")}
    assert [(r.language, r.name) for r in loaded.missing_tasks] == [("de", "xstorycloze_de")]


def test_accelerator_type_needs_gpus_and_unknown_types_warn(tmp_path, hub_study, capsys):
    study = mutate(hub_study, "models.0.accelerator_type", "H100")
    code, out, err = run_cli(capsys, "validate", str(write_study(tmp_path, study)))
    assert code == 0 and "accelerator_type" not in err
    typo = mutate(hub_study, "models.0.accelerator_type", "H1OO")
    code, out, err = run_cli(capsys, "validate", str(write_study(tmp_path, typo, "typo.yaml")))
    assert code == 0 and "warning: models[0].accelerator_type: 'H1OO' is not an accelerator type Ray detects" in err
    cpu = mutate(mutate(hub_study, "models.0.accelerator_type", "H100"), "models.0.gpus", 0)
    assert_rejected(capsys, write_study(tmp_path, cpu, "cpu.yaml"), "models[0].accelerator_type: needs gpus of 1 or more")


def test_node_capacity_counts_only_nodes_with_the_accelerator():
    from sweep.execution.scheduler import Shape, node_capacity

    h100_node = {"GPU": 8.0, "CPU": 96.0, "accelerator_type:H100": 1.0}
    a10g_node = {"GPU": 4.0, "CPU": 48.0, "accelerator_type:A10G": 1.0}
    assert node_capacity(h100_node, Shape(gpus=4, cpus=1, accelerator="H100")) == 2
    assert node_capacity(a10g_node, Shape(gpus=4, cpus=1, accelerator="H100")) == 0
    assert node_capacity(a10g_node, Shape(gpus=4, cpus=1)) == 1


def test_hub_repo_template_is_checked():
    from pydantic import ValidationError

    from sweep.study.schema import SaveModelsSpec

    assert SaveModelsSpec(enabled=True, hub_repo="me/{model}-{pruner}-{sparsity}-cal-{calibration}-seed{seed}")
    with pytest.raises(ValidationError, match="unknown field"):
        SaveModelsSpec(hub_repo="me/{modle}")
    with pytest.raises(ValidationError, match="owner/name"):
        SaveModelsSpec(hub_repo="{model}")
