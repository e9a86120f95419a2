"""Where a study directory lives: a local folder, or object storage through fsspec (s3://, gs://, ...).

Two implementations of one small interface. A local folder gets POSIX guarantees: exclusive create,
append + fsync, atomic rename. Object storage has none of these; there every write is a whole-object
PUT (atomic by nature), appends become rewrites of a bounded segment, and exclusive create is
check-then-write-then-verify (best effort, see StudyStore.acquire). `file://` URLs go through fsspec on
purpose: they exercise the object-storage path on a local disk.
"""
from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Protocol

from engine.io import atomic_path, atomic_write_bytes


class Location(Protocol):
    url: str
    is_local: bool

    def join(self, *parts: str) -> str: ...
    def read_bytes(self, rel: str) -> bytes | None: ...
    def write_atomic(self, rel: str, data: bytes) -> None: ...
    def upload_atomic(self, rel: str, local: Path) -> None: ...
    def create_exclusive(self, rel: str, data: bytes) -> bool: ...
    def delete(self, rel: str) -> None: ...
    def move(self, rel: str, new_rel: str) -> None: ...
    def list(self, folder: str, suffix: str) -> list[str]: ...
    def exists(self, rel: str) -> bool: ...
    def local_path(self, rel: str = "") -> Path | None: ...


def is_url(location: str | Path) -> bool:
    return "://" in str(location)


def open_location(location: str | Path) -> Location:
    if is_url(location):
        return FsspecLocation(str(location))
    return LocalLocation(Path(location))


class LocalLocation:
    is_local = True

    def __init__(self, root: Path):
        self.root = Path(os.path.abspath(Path(root).expanduser()))
        self.url = str(self.root)

    def join(self, *parts: str) -> str:
        return str(self.root.joinpath(*parts))

    def local_path(self, rel: str = "") -> Path:
        return self.root / rel if rel else self.root

    def read_bytes(self, rel: str) -> bytes | None:
        try:
            return (self.root / rel).read_bytes()
        except FileNotFoundError:
            return None

    def write_atomic(self, rel: str, data: bytes) -> None:
        atomic_write_bytes(self.root / rel, data, durable=True)

    def upload_atomic(self, rel: str, local: Path) -> None:
        with atomic_path(self.root / rel) as temporary:
            shutil.copyfile(local, temporary)

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        return True

    def delete(self, rel: str) -> None:
        (self.root / rel).unlink(missing_ok=True)

    def move(self, rel: str, new_rel: str) -> None:
        os.replace(self.root / rel, self.root / new_rel)

    def list(self, folder: str, suffix: str) -> list[str]:
        base = self.root / folder if folder else self.root
        if not base.is_dir():
            return []
        return sorted(_rel(folder, p.name) for p in base.iterdir()
                      if p.name.endswith(suffix) and not p.name.startswith(".") and p.is_file())

    def exists(self, rel: str) -> bool:
        return (self.root / rel).exists()


class FsspecLocation:
    is_local = False

    def __init__(self, url: str):
        import fsspec

        try:
            self.fs, self.root = fsspec.core.url_to_fs(url)
        except (ImportError, ValueError) as err:
            raise ValueError(f"cannot open {url}: {err}. For s3:// install s3fs, for gs:// install gcsfs "
                             "(pip install 'calibration-sweep[cloud]').") from err
        self.root = self.root.rstrip("/")
        self.url = url.rstrip("/")

    def join(self, *parts: str) -> str:
        return "/".join([self.url, *parts])

    def _path(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def local_path(self, rel: str = "") -> None:
        return None

    def read_bytes(self, rel: str) -> bytes | None:
        try:
            with self.fs.open(self._path(rel), "rb") as handle:
                return handle.read()
        except FileNotFoundError:
            return None

    def write_atomic(self, rel: str, data: bytes) -> None:
        path = self._path(rel)
        parent = path.rsplit("/", 1)[0]
        self.fs.makedirs(parent, exist_ok=True)
        # One PUT is atomic on object stores; the temporary name keeps local and NFS-like backends honest.
        temporary = f"{parent}/.{path.rsplit('/', 1)[1]}.{uuid.uuid4().hex[:8]}.tmp"
        with self.fs.open(temporary, "wb") as handle:
            handle.write(data)
        self.fs.mv(temporary, path)

    def upload_atomic(self, rel: str, local: Path) -> None:
        """Streams a local file up (a saved model's shards are gigabytes: never read whole into memory)."""
        path = self._path(rel)
        parent = path.rsplit("/", 1)[0]
        self.fs.makedirs(parent, exist_ok=True)
        temporary = f"{parent}/.{path.rsplit('/', 1)[1]}.{uuid.uuid4().hex[:8]}.tmp"
        self.fs.put_file(str(local), temporary)
        self.fs.mv(temporary, path)

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        if self.exists(rel):
            return False
        self.write_atomic(rel, data)
        return self.read_bytes(rel) == data  # someone else's write landed last: not ours

    def delete(self, rel: str) -> None:
        try:
            self.fs.rm(self._path(rel))
        except FileNotFoundError:
            pass

    def move(self, rel: str, new_rel: str) -> None:
        self.fs.mv(self._path(rel), self._path(new_rel))

    def list(self, folder: str, suffix: str) -> list[str]:
        try:
            names = self.fs.ls(self._path(folder) if folder else self.root, detail=False)
        except FileNotFoundError:
            return []
        out = []
        for name in names:
            base = str(name).rstrip("/").rsplit("/", 1)[-1]
            if base.endswith(suffix) and not base.startswith("."):
                out.append(_rel(folder, base))
        return sorted(out)

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self._path(rel))


def _rel(folder: str, name: str) -> str:
    return f"{folder}/{name}" if folder else name
