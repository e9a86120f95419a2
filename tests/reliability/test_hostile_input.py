"""Hostile input: a corpus of malformed and malicious study files, each refused by `sweep validate`, `sweep
plan` and `sweep run --out DIR` with exit code 2, the field named, no traceback and nothing written; and
property-based fuzzing of the schema (random deletions, type swaps and values at random paths of a valid
study, and random edits of its YAML text), where validation may only accept (exit 0) or refuse
(StudyInvalid, exit 2), and an unknown key is always refused at its own path.
Longer, randomised fuzzing: SWEEP_FUZZ_EXAMPLES=4000 pytest tests/reliability/test_hostile_input.py -k "fuzz or key" -s

Each file in bad_studies/ starts with comment lines saying what its refusal must contain:
  # expect: models[1].trust_remote_code   a problem line names this field (`  models[1].trust_remote_code: ...`)
  # expect: <file>                        the file as a whole is refused (YAML, encoding, shape)
  # message: auto_map                     and that line says this
Relative paths in the corpus point into fixtures/ (tiny model directories: remote code, broken configs).

Covered elsewhere, not repeated here: a non-finite perplexity raising TrialFailed with its reason
(tests/engine/test_trial.py::test_non_finite_perplexity_fails_the_trial_with_a_reason) and the remote-code
refusal's opt-in (tests/study/test_study_validation.py::test_remote_code_is_refused_unless_asked).
"""
from __future__ import annotations

import copy
import io
import os
import shutil
import tempfile
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sweep.cli.main import main, report_invalid
from sweep.study.grid import expand
from sweep.study.load import load_study, study_from_data
from sweep.study.problems import StudyInvalid, join_path
from tests.conftest import HUB_STUDY

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "bad_studies"
FIXTURES = HERE / "fixtures"
BAD_STUDIES = sorted(CORPUS.glob("*.yaml"))


def expectations(path: Path) -> tuple[list[str], list[str]]:
    """The `# expect:` and `# message:` header lines of a corpus file."""
    raw = path.read_bytes()
    text = raw.decode("utf-16") if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else raw.decode("utf-8", "replace")
    fields, messages = [], []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        key, _, value = line.lstrip("# ").partition(":")
        if key == "expect":
            fields.append(value.strip())
        elif key == "message":
            messages.append(value.strip())
    return fields, messages


def snapshot(*folders: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under `folders` with its size and modification time."""
    out = {}
    for folder in folders:
        for path in [folder, *folder.rglob("*")]:
            stat = path.stat()
            out[str(path)] = (stat.st_size if path.is_file() else -1, stat.st_mtime_ns)
    return out


def assert_refusal_names(err: str, path: Path) -> None:
    fields, messages = expectations(path)
    assert fields and messages, f"{path.name}: no # expect: / # message: header"
    assert "Traceback" not in err, err
    header, *problems = err.splitlines()
    assert header.startswith(str(path)) and "invalid study file" in header and "nothing was started or written" in header, err
    problems = [line.strip() for line in problems if line.startswith("  ")]
    assert problems, err
    for field in fields:
        if field == "<file>":
            candidates = problems  # the header names the file (and line); the problem line says why
        else:
            candidates = [line for line in problems if line.startswith(f"{field}: ")]
            assert candidates, f"{path.name}: no problem names {field!r}:\n{err}"
        for message in messages:
            assert any(message in line for line in candidates), f"{path.name}: {message!r} not said of {field!r}:\n{err}"


def test_the_corpus_is_large_and_every_file_says_what_it_expects():
    assert len(BAD_STUDIES) >= 40
    for path in BAD_STUDIES:
        fields, messages = expectations(path)
        assert fields and messages, path.name


@pytest.mark.parametrize("path", BAD_STUDIES, ids=[p.stem for p in BAD_STUDIES])
def test_bad_study_is_refused_by_validate_and_run(path, tmp_path, monkeypatch, capsys):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    out = tmp_path / "out"
    before = snapshot(CORPUS, FIXTURES, cwd)
    for argv in (["validate", str(path)], ["plan", str(path)], ["run", str(path), "--out", str(out), "--no-progress"]):
        code = main(argv)
        stdout, err = capsys.readouterr()
        assert code == 2, (argv[0], stdout, err)
        assert_refusal_names(err, path)
        assert not out.exists(), f"{argv[0]} wrote {out}"
        assert snapshot(CORPUS, FIXTURES, cwd) == before, f"{argv[0]} wrote or touched a file"
    assert not Path("/tmp/pwned-by-study-file").exists()


@pytest.mark.parametrize("size, expected", [(2 << 20, "over the 1024 KiB limit"), (420_000, "expands to more than")],
                         ids=["2MiB-description", "210k-element-list"])
def test_huge_files_are_refused(size, expected, tmp_path, capsys):
    """Generated here rather than kept in the corpus: a 2 MiB study, and one under the size limit whose
    flow list has more values than any study needs."""
    path = tmp_path / "huge.yaml"
    if "limit" in expected:
        path.write_text(yaml.safe_dump({**HUB_STUDY, "description": "x" * size}), encoding="utf-8")
    else:
        path.write_text(yaml.safe_dump(HUB_STUDY) + "extra: [" + "0," * (size // 2) + "0]\n", encoding="utf-8")
    before = snapshot(tmp_path)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err
    assert snapshot(tmp_path) == before


def test_remote_code_fixture_passes_once_the_study_opts_in(tmp_path, capsys):
    """The corpus' remote-code refusal is about the missing opt-in, not the directory: with
    trust_remote_code: true the same study validates, and validation never imports the model's code
    (fixtures/remote_code_model/modeling_evil.py raises if imported)."""
    shutil.copytree(FIXTURES / "remote_code_model", tmp_path / "fixtures" / "remote_code_model")
    (tmp_path / "bad_studies").mkdir()
    text = (CORPUS / "model_local_remote_code.yaml").read_text(encoding="utf-8")
    opted_in = text.replace("path: ../fixtures/remote_code_model",
                            "path: ../fixtures/remote_code_model\n    trust_remote_code: true")
    assert opted_in != text
    path = tmp_path / "bad_studies" / "opted_in.yaml"
    path.write_text(opted_in, encoding="utf-8")
    assert main(["validate", str(path)]) == 0, capsys.readouterr().err


# -- property-based fuzzing of the schema ---------------------------------------------------------------------

KNOWN_KEYS = sorted({
    "name", "description", "models", "calibration", "pruners", "baselines", "evaluation", "analyses", "save_models",
    "execution", "hub", "path", "revision", "dtype", "gpus", "accelerator_type", "max_seq_len", "trust_remote_code",
    "source", "languages", "samples", "seq_len", "seeds", "kind", "dataset", "config", "split", "text_field", "method",
    "sparsity", "params", "targets", "dense", "perplexity", "tasks", "batch_size", "window", "max_tokens", "task",
    "shots", "limit", "masks", "lape", "subspace", "enabled", "save_masks", "sample_bits", "error_tokens",
    "lape_quantile", "activation_quantile", "rank", "hub_repo", "private", "output_dir", "retries", "trial_timeout_s",
    "placement_timeout_s", "cpus_per_actor", "max_actors", "device", "mix", "blocksize", "dampening",
    "max_dampening_retries", "sampling", "separator", "threshold_from", "token_sample", "significance", "alpha",
    "resamples", "seed",
})  # include_path is left out: a random existing folder (/, ..) would be scanned for task files
TRICKY_STRINGS = [
    "", " ", "~", "null", "no", "yes", "off", "2:4", "3:2", "0:4", "4:0", "2:4:8", "50%", "150%", "-0.5", "1e999",
    "nan", ".nan", "published", "packed", "own", "dense", "<|eot_id|>", "en", "de", "sw", "en+de", "en:3+de:1", "en:0+de:1", "en+en", "en:1e308+de:1e308", "+", ":", "xx",
    "wanda", "sparsegpt", "magnitude", "hub", "local", "float16", "cpu", "cuda", "org/model", "../../etc/passwd", "/",
    ".", "..", "**", "[", "(", "*", "{study}", "{0}", "{", "}", "{study.__class__}", "{lang!r}", "{mc4}", "{flores}",
    "${HOME}", "$NOPE", "\x00", "\n", "\t", "é", "日本", "\u202e", "a" * 300,
]

# keys as typed by someone used to other tools: known ones, capitalised or in kebab case, and random text
keys = st.one_of(st.sampled_from(KNOWN_KEYS), st.sampled_from(KNOWN_KEYS).map(str.capitalize),
                 st.sampled_from(KNOWN_KEYS).map(lambda key: key.replace("_", "-")), st.text(max_size=8))
scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(), st.integers(min_value=-(10**400), max_value=10**400),
    st.floats(allow_nan=True, allow_infinity=True), st.floats(min_value=0.0, max_value=1.0),
    st.text(max_size=12), st.sampled_from(TRICKY_STRINGS),
)
values = st.recursive(
    scalars,
    lambda children: st.one_of(st.lists(children, max_size=4),
                               st.dictionaries(keys, children, max_size=4)),
    max_leaves=8,
)


def paths_in(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for key, child in node.items():
            yield from paths_in(child, (*prefix, key))
    elif isinstance(node, list):
        for index, child in enumerate(node):
            yield from paths_in(child, (*prefix, index))


def swap_type(value):
    """The same content in another shape: a list's first item, a scalar in a list, text of a number, ..."""
    if isinstance(value, list):
        return value[0] if value else {}
    if isinstance(value, dict):
        return list(value.values())
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str):
        return [value]
    return 0


@st.composite
def mutated_studies(draw, base: dict) -> dict:
    study = copy.deepcopy(base)
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        where = draw(st.sampled_from(list(paths_in(study))))
        action = draw(st.sampled_from(["delete", "replace", "swap", "add_key"]))
        if not where:
            if action == "replace" and draw(st.integers(0, 9)) == 0:
                return draw(values)  # the whole document replaced: a list, a scalar, ...
            action = "add_key"
        parent = study
        for part in where[:-1]:
            parent = parent[part]
        node = parent[where[-1]] if where else study
        if action == "add_key":
            if isinstance(node, dict):
                node[draw(keys)] = draw(values)
            elif isinstance(node, list):
                node.append(draw(values))
            continue
        if action == "delete":
            del parent[where[-1]]
        elif action == "replace":
            parent[where[-1]] = draw(values)
        else:
            parent[where[-1]] = swap_type(node)
    return study


def local_base(folder: Path) -> dict:
    """A valid study on local files: a model directory (config.json only) and a text corpus, inside `folder`."""
    (folder / "model").mkdir()
    (folder / "model" / "config.json").write_text('{"model_type": "llama", "max_position_embeddings": 512}')
    for lang in ("en", "de", "sw"):
        (folder / "corpus" / lang).mkdir(parents=True)
        for split in ("calibration", "evaluation"):
            (folder / "corpus" / lang / f"{split}.jsonl").write_text('{"text": "some text"}\n')
    return {
        "name": "local-fuzz",
        "models": [{"name": "m", "path": "model", "dtype": "float32", "gpus": 0, "max_seq_len": 512}],
        "calibration": {"source": {"kind": "local", "path": "corpus", "split": "calibration"},
                        "languages": ["en", "de+sw", {"mix": {"en": 3, "sw": 1}}], "samples": 8, "seq_len": 64,
                        "seeds": [0]},
        "pruners": [{"method": "magnitude", "sparsity": 0.5}, {"method": "wanda", "sparsity": [0.5, "2:4"]},
                    {"method": "sparsegpt", "sparsity": "50%", "params": {"blocksize": 32}}],
        "evaluation": {"languages": ["en", "de", "sw"],
                       "perplexity": {"source": {"kind": "local", "path": "corpus", "split": "evaluation"},
                                      "window": 64, "max_tokens": 256}},
        "analyses": {"masks": {"enabled": True}, "lape": {"enabled": True}},
        "execution": {"output_dir": "runs/{study}", "retries": 1, "device": "cpu"},
    }


class FuzzOutcome:
    def __init__(self):
        self.cases = self.accepted = self.refused = 0
        self.passed = False  # every case accepted or refused cleanly (a crash fails the test instead)


OUTCOMES: dict[str, FuzzOutcome] = {}


def validate_in(folder: Path, text: str | bytes, outcome: FuzzOutcome) -> None:
    """Validates `text` as a study file in `folder` through the CLI and directly: exit 0 or 2 and
    StudyInvalid only, a usable message, and nothing written in `folder`."""
    path = folder / "study.yaml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
    before = snapshot(folder)
    stdout, stderr = io.StringIO(), io.StringIO()
    with redirect_stdout(stdout), redirect_stderr(stderr):
        code = main(["validate", str(path)])
    assert code in (0, 2), stderr.getvalue()
    assert "Traceback" not in stderr.getvalue()
    try:
        expand(load_study(path))
    except StudyInvalid as err:
        assert code == 2
        assert err.problems and all(isinstance(p.path, str) and p.message for p in err.problems)
        report_invalid(err, io.StringIO())
        outcome.refused += 1
    else:
        assert code == 0, stderr.getvalue()
        outcome.accepted += 1
    outcome.cases += 1
    assert snapshot(folder) == before, "validation wrote or touched a file"


FUZZ_SETTINGS = settings(max_examples=200, deadline=None, database=None, derandomize=True,
                         suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
if os.environ.get("SWEEP_FUZZ_EXAMPLES"):  # a longer, randomised run (see the module docstring)
    FUZZ_SETTINGS = settings(FUZZ_SETTINGS, max_examples=int(os.environ["SWEEP_FUZZ_EXAMPLES"]), derandomize=False)


@pytest.fixture(scope="module")
def fuzz_folder():
    with tempfile.TemporaryDirectory(prefix="hostile-fuzz-") as name:
        folder = Path(name)
        (folder / "hub").mkdir()
        (folder / "local").mkdir()
        yield folder, local_base(folder / "local")


def dump(study) -> str:
    return yaml.safe_dump(study, sort_keys=False, allow_unicode=True)


@pytest.mark.parametrize("source", ["hub", "local"])
def test_fuzzed_study_is_accepted_or_refused_cleanly(fuzz_folder, source):
    folder, local = fuzz_folder
    outcome = OUTCOMES.setdefault(f"{source} schema", FuzzOutcome())

    @FUZZ_SETTINGS
    @given(mutated_studies(HUB_STUDY if source == "hub" else local))
    def check(study):
        validate_in(folder / source, dump(study), outcome)

    check()
    assert outcome.refused > 0 and outcome.cases >= 200
    outcome.passed = True


@st.composite
def with_unknown_key(draw, bases: list[dict]) -> tuple[dict, str]:
    """A valid study with one key no schema knows, in a random mapping of it (not in a mix, whose keys are
    languages); returns the study and the field path the refusal must name."""
    study = copy.deepcopy(draw(st.sampled_from(bases)))
    mappings = [where for where in paths_in(study) if "mix" not in where and isinstance(_at(study, where), dict)]
    where = draw(st.sampled_from(mappings))
    key = draw(keys.filter(lambda k: k and k == k.strip() and k not in KNOWN_KEYS))  # params keys are stripped
    _at(study, where)[key] = draw(values)
    return study, join_path(*where, key)


def _at(study, where):
    for part in where:
        study = study[part]
    return study


def test_an_unknown_key_is_refused_where_it_is(fuzz_folder):
    """`Execution:`, `output-dir:`, `Seeds:`, a random name: anywhere in the study, the refusal names that key
    at its own path and lists what is allowed there."""
    folder, local = fuzz_folder
    outcome = OUTCOMES.setdefault("unknown keys", FuzzOutcome())

    @FUZZ_SETTINGS
    @given(with_unknown_key([HUB_STUDY, local]))
    def check(case):
        study, field = case
        with pytest.raises(StudyInvalid) as refused:
            study_from_data(study, "study.yaml", folder / "local")
        assert any(p.path == field and p.message.startswith("unknown key") for p in refused.value.problems), (
            field, [str(p) for p in refused.value.problems])
        outcome.cases += 1
        outcome.refused += 1

    check()
    outcome.passed = True


YAML_PIECES = ["\n", " ", "  ", "\t", ":", ": ", "- ", "[", "]", "{", "}", ",", "'", '"', "&a ", "*a", "!!str ", "!!int ",
               "!!python/object:os.system ", "? ", "|", ">", "#", "%YAML 1.1\n", "---\n", "...\n", "<<: ", "\\",
               "\x00", "\ufeff", "2:4", "no", "~", "0x1F", ".inf", "1e999", "\udcff"]


@st.composite
def edited_text(draw, text: str) -> str:
    for _ in range(draw(st.integers(min_value=1, max_value=5))):
        at = draw(st.integers(min_value=0, max_value=len(text)))
        kind = draw(st.sampled_from(["insert", "delete", "duplicate_line", "swap_lines"]))
        if kind == "insert":
            text = text[:at] + draw(st.one_of(st.sampled_from(YAML_PIECES), st.text(max_size=4))) + text[at:]
        elif kind == "delete":
            text = text[:at] + text[at + draw(st.integers(min_value=1, max_value=12)):]
        else:
            lines = text.split("\n")
            i = draw(st.integers(min_value=0, max_value=len(lines) - 1))
            j = draw(st.integers(min_value=0, max_value=len(lines) - 1))
            if kind == "duplicate_line":
                lines.insert(j, lines[i])
            else:
                lines[i], lines[j] = lines[j], lines[i]
            text = "\n".join(lines)
    return text


def test_fuzzed_yaml_text_is_accepted_or_refused_cleanly(fuzz_folder):
    folder, base = fuzz_folder
    outcome = OUTCOMES.setdefault("local YAML text", FuzzOutcome())

    @FUZZ_SETTINGS
    @given(edited_text(dump(base)))
    def check(text):
        validate_in(folder / "local", text, outcome)

    check()
    assert outcome.refused > 0 and outcome.cases >= 200
    outcome.passed = True


def test_fuzz_figures():
    """Prints the fuzzing figures (for reports/reliability.md) when run after the fuzz tests."""
    for name, outcome in OUTCOMES.items():
        state = "no crash" if outcome.passed else "FAILED (see above)"
        print(f"fuzz {name}: {outcome.cases} cases, {outcome.accepted} accepted, {outcome.refused} refused, {state}")
