"""Trial keys: stable across runs and processes, equal for equivalent spellings, changed only by fields
that change a trial's result."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from sweep.study.grid import KEY_VERSION, expand
from sweep.study.load import load_study
from tests.conftest import REPO, STUDIES, write_study
from tests.study.test_study_validation import mutate


def keys(tmp_path, data) -> dict[str, str]:
    study = load_study(write_study(tmp_path, data, name=f"s{len(list(tmp_path.iterdir()))}.yaml"))
    return {t.name: t.key for t in expand(study).trials}


# One trial of the reference study, pinned: if this changes, old study directories stop matching.
# Change it only together with KEY_VERSION, or when the reference study itself changes what it computes
# (last: `sampling: published`, and English from mC4's `en-multi` instead of C4's `en`, which changes
# the text of every trial; keys of unchanged studies stay as they were).
PINNED = {
    "llama3-8b-instruct.dense": "v1-e2f677aeb4a424d1ac99",
    "llama3-8b-instruct.wanda.s50.cal-ar.seed0": "v1-f16edadb09adf2c0210e",
}


def test_reference_keys_are_pinned():
    trials = {t.name: t.key for t in expand(load_study(STUDIES / "kurz2024.yaml")).trials}
    assert KEY_VERSION == 1
    for name, key in PINNED.items():
        assert trials[name] == key


def test_keys_equal_across_processes():
    code = ("import json; from sweep.study.grid import expand; from sweep.study.load import load_study; "
            f"print(json.dumps({{t.name: t.key for t in expand(load_study({str(STUDIES / 'kurz2024.yaml')!r})).trials}}))")
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": str(seed), "PATH": "/usr/bin:/bin"}, cwd=REPO).stdout
            for seed in (1, 2)]
    in_process = {t.name: t.key for t in expand(load_study(STUDIES / "kurz2024.yaml")).trials}
    assert json.loads(runs[0]) == json.loads(runs[1]) == in_process
    assert len(set(in_process.values())) == len(in_process) == 340


def test_keys_unique_and_names_readable(tmp_path, hub_study):
    trials = keys(tmp_path, hub_study)
    assert len(set(trials.values())) == len(trials)
    assert "m1.wanda.2of4.cal-de+en.seed1" in trials
    assert "m1.magnitude.s50" in trials  # magnitude ignores calibration: one trial, not one per language
    assert "m2.dense" in trials


@pytest.mark.parametrize(
    "field, a, b",
    [
        ("pruners.1.sparsity", 0.5, 0.50),
        ("pruners.1.sparsity", 0.5, "0.50"),
        ("pruners.1.sparsity", 0.5, "50%"),
        ("pruners.0.sparsity", [0.5, "2:4"], ["2-4", 0.5]),
        ("pruners.1.params", {"blocksize": 128}, {}),
        ("pruners.1.params", {}, {"blocksize": 128, "dampening": 0.01, "max_dampening_retries": 4}),
        ("calibration.languages", ["en", "de", "en+de"], ["de+en", "en", "de"]),
        ("calibration.languages", ["en", "de", "en+de"], ["en", "de", {"mix": {"de": 1, "en": 1}}]),
        ("calibration.languages", ["en", "de", "en:3+de:1"], ["en", "de", {"mix": {"de": 0.25, "en": 0.75}}]),
        ("evaluation.languages", ["en", "de", "sw"], ["sw", "en", "de"]),
    ],
)
def test_equivalent_spellings_give_equal_keys(tmp_path, hub_study, field, a, b):
    assert set(keys(tmp_path, mutate(hub_study, field, a)).values()) == set(keys(tmp_path, mutate(hub_study, field, b)).values())


def test_key_order_in_file_does_not_matter(tmp_path, hub_study):
    def reorder(node):
        if isinstance(node, dict):
            return {k: reorder(node[k]) for k in reversed(list(node))}
        if isinstance(node, list):
            return [reorder(x) for x in node]
        return node

    assert keys(tmp_path, hub_study) == keys(tmp_path, reorder(hub_study))


@pytest.mark.parametrize(
    "field, value",
    [
        ("evaluation.batch_size", 64),
        ("execution", {"retries": 9, "output_dir": "elsewhere/{study}", "device": "cpu", "cpus_per_actor": 4,
                       "trial_timeout_s": 10, "max_actors": 3}),
        ("models.0.gpus", 8),
        ("models.0.max_seq_len", 8192),
        ("models.0.trust_remote_code", True),
        ("description", "other words"),
        ("calibration.sampling", "packed"),  # the default, spelled out: keys from before the option stay valid
        ("analyses", {"lape": {"enabled": True}, "masks": {"enabled": True}}),
    ],
)
def test_fields_that_do_not_change_results_keep_keys(tmp_path, hub_study, field, value):
    assert keys(tmp_path, hub_study) == keys(tmp_path, mutate(hub_study, field, value))


@pytest.mark.parametrize(
    "field, value, affected",
    [
        ("models.0.revision", "feedbeef", "m1."),
        ("models.0.dtype", "float16", "m1."),
        ("calibration.samples", 32, ".cal-"),
        ("calibration.seq_len", 512, ".cal-"),
        ("calibration.source.revision", "r2", ".cal-"),
        ("calibration.sampling", "published", ".cal-"),
        ("calibration.separator", "<|end_of_text|>", ".cal-"),
        ("pruners.1.params", {"blocksize": 32}, ".sparsegpt."),
        ("pruners.0.targets", ["mlp"], ".wanda."),
        ("evaluation.perplexity.window", 128, ""),
        ("evaluation.tasks", [{"task": "belebele_{flores}", "shots": 5}], ""),
        ("evaluation.languages", ["en", "de"], ""),
    ],
)
def test_fields_that_change_results_change_keys(tmp_path, hub_study, field, value, affected):
    before = keys(tmp_path, hub_study)
    after = keys(tmp_path, mutate(hub_study, field, value))
    assert set(before) == set(after)
    changed = {name for name in before if before[name] != after[name]}
    expected = {name for name in before if affected in name and (".cal-" not in affected or "magnitude" not in name)}
    assert changed == expected and changed


def test_renamed_model_keeps_its_keys(tmp_path, hub_study):
    before = keys(tmp_path, hub_study)
    after = keys(tmp_path, mutate(hub_study, "models.0.name", "renamed"))
    assert sorted(before.values()) == sorted(after.values())


def test_seed_and_sparsity_separate_trials(tmp_path, hub_study):
    trials = keys(tmp_path, hub_study)
    assert trials["m1.wanda.s50.cal-en.seed0"] != trials["m1.wanda.s50.cal-en.seed1"]
    assert trials["m1.wanda.s50.cal-en.seed0"] != trials["m1.wanda.2of4.cal-en.seed0"]
    assert trials["m1.wanda.s50.cal-en.seed0"] != trials["m1.sparsegpt.s50.cal-en.seed0"]


@pytest.fixture
def local_model(tmp_path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    path = tmp_path / "models" / "tiny"
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def test_local_model_key_follows_content_not_path(tmp_path, hub_study, local_model):
    study = mutate(hub_study, "models.0", {"name": "m1", "path": "models/tiny", "max_seq_len": 512})
    before = keys(tmp_path, study)
    moved = tmp_path / "moved" / "tiny"
    shutil.copytree(local_model, moved)
    after_move = keys(tmp_path, mutate(study, "models.0.path", str(moved)))
    assert before == after_move

    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(moved)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(1.5)
    model.save_pretrained(moved)
    retrained = keys(tmp_path, mutate(study, "models.0.path", str(moved)))
    assert {n for n in before if before[n] != retrained[n]} == {n for n in before if n.startswith("m1.")}


def test_english_is_read_from_mc4_and_the_key_names_the_config(tmp_path, hub_study):
    """allenai/c4 config `en` is the original English C4; mC4's English is `en-multi` (the dataset's
    README configs). `{mc4}` names mC4's, and the key records it, so results of the old mapping never match."""
    from engine.languages import get_language

    assert get_language("en").mc4 == "en-multi" and get_language("de").mc4 == "de"
    study = load_study(write_study(tmp_path, hub_study))
    trials = {t.name: t for t in expand(study).trials}
    assert trials["m1.wanda.s50.cal-en.seed0"].payload()["calibration"]["source"]["mc4_configs"] == {"en": "en-multi"}
    assert "mc4_configs" not in trials["m1.wanda.s50.cal-de.seed0"].payload()["calibration"]["source"]
    assert trials["m1.dense"].payload()["evaluation"]["perplexity"]["source"]["mc4_configs"] == {"en": "en-multi"}


def test_separator_only_with_packed_sampling(tmp_path, hub_study):
    from sweep.study.problems import StudyInvalid

    with pytest.raises(StudyInvalid, match="separator"):
        load_study(write_study(tmp_path, mutate(mutate(hub_study, "calibration.sampling", "published"),
                                                "calibration.separator", "<|end_of_text|>")))
