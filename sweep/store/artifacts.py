"""A trial's artifacts: published from a worker's local staging folder to the study directory, and read
back from it (by the report's analyses and tests)."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from sweep.store.locations import open_location

if TYPE_CHECKING:
    from sweep.store.study_store import StudyStore


def publish_directory(local: Path, destination: str) -> dict[str, str]:
    """Copies every file of `local` to `destination` (a folder path or URL), each written under a
    temporary name and renamed, so a reader never sees half an artifact. Returns name -> location."""
    target = open_location(destination)
    out = {}
    for path in sorted(Path(local).rglob("*")):
        if path.is_file() and not path.name.startswith("."):
            rel = path.relative_to(local).as_posix()
            target.upload_atomic(rel, path)
            out[rel] = target.join(rel)
    return out


class ArtifactReader:
    """Reads a trial's artifact from a local or remote study directory (remote ones via a temp copy)."""

    def __init__(self, store: StudyStore):
        self.store = store
        self._temp = tempfile.TemporaryDirectory(prefix="sweep-analysis-")

    def path(self, key: str, name: str) -> Path | None:
        rel = f"artifacts/{key}/{name}"
        if self.store.is_local:
            path = self.store.location.local_path(rel)
            return path if path.is_file() else None
        data = self.store.location.read_bytes(rel)
        if data is None:
            return None
        path = Path(self._temp.name) / key / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path
