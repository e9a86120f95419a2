"""Publishing a trial's artifacts from a worker's local staging folder to the study directory."""
from __future__ import annotations

from pathlib import Path

from sweep.store.locations import open_location


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
