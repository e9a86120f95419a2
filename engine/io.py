"""Writing files whole or not at all, and where the project keeps its caches.

Every cache and result file is written under a unique temporary name beside its target and then renamed
over it: a crash leaves the old file or the new one, never half of one, and two processes filling the
same entry each write a whole file (the reader sees one or the other).
"""
from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# The checkout (or installed tree) this package lives in; default caches go under <root>/.cache.
PROJECT_ROOT = Path(__file__).resolve().parent.parent


# Where trials cache what they derive (calibration windows, evaluation tokens, the lm-eval task index).
CACHE_ENV = "SWEEP_CACHE_DIR"


def project_cache_dir() -> Path:
    """The offline assets' default root: <repo>/.cache."""
    return PROJECT_ROOT / ".cache"


def cache_dir() -> Path:
    """$SWEEP_CACHE_DIR, else ~/.cache/calibration-sweep: one per machine, shared by its workers."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "calibration-sweep"


def calibration_cache_dir() -> Path:
    """Where a worker caches calibration windows and evaluation tokens when the study names no cache."""
    return cache_dir() / "calibration"


def temporary_sibling(path: Path) -> Path:
    """A name in `path`'s folder that no other process or call uses, hidden and ending in .tmp."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path to write `path`'s new content to (a file, or a folder where `path` does
    not exist yet: a rename cannot replace a non-empty folder); renames it over `path` when the block
    ends, or removes it if the block raised."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_sibling(path)
    try:
        yield temporary
        os.replace(temporary, path)
    except BaseException:
        _remove(temporary)
        raise


def atomic_write_bytes(path: str | Path, data: bytes, durable: bool = False) -> None:
    """`durable`: fsync before the rename, for records that must survive a power cut (event logs' peers,
    plan.json), not just a crash of this process."""
    with atomic_path(path) as temporary:
        with open(temporary, "wb") as handle:
            handle.write(data)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
