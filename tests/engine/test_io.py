"""engine/io.py: every cache and result file is written whole or not at all."""
from __future__ import annotations

import pytest

from engine.io import atomic_path, atomic_write_bytes, temporary_sibling


def test_a_write_lands_whole_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "deep" / "results.parquet"
    atomic_write_bytes(target, b"x" * 1000, durable=True)
    atomic_write_bytes(target, b"y" * 10)
    assert target.read_bytes() == b"y" * 10
    assert [p.name for p in target.parent.iterdir()] == ["results.parquet"]


def test_a_failed_write_keeps_the_old_file_and_removes_its_temporary(tmp_path):
    target = tmp_path / "plan.json"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(target) as temporary:
            temporary.write_bytes(b"half")
            raise RuntimeError("disk full")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]


def test_a_failed_folder_write_is_removed_whole(tmp_path):
    with pytest.raises(ValueError):
        with atomic_path(tmp_path / "model") as temporary:
            (temporary / "sub").mkdir(parents=True)
            (temporary / "sub" / "weights").write_bytes(b"w")
            raise ValueError
    assert list(tmp_path.iterdir()) == []


def test_temporary_names_never_repeat_and_stay_beside_the_target(tmp_path):
    names = {temporary_sibling(tmp_path / "a.safetensors") for _ in range(1000)}
    assert len(names) == 1000
    assert all(n.parent == tmp_path and n.name.startswith(".a.safetensors.") and n.suffix == ".tmp" for n in names)
