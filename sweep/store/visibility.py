"""Whether a study directory is one every worker sees, checked before trials write into it.

Workers write masks, statistics and saved models straight into a local study directory. On a cluster
that directory must be the same one on every node (a shared mount); a path on the head's own disk would
have each worker write to its own node's disk, whose files go when an autoscaler removes the node. Two
checks guard this:

* before anything starts, `local_dir_refusal`: a local directory on a cluster needs `--shared-dir` (the
  user says it is shared), and no study directory may lie in Ray's temporary copy of a job's working
  directory, which Ray deletes;
* then, for real, a sentinel: the driver writes a file with a fresh random token into the study
  directory, and each worker actor reads it back when it starts (`sentinel_problem`). A node that does
  not mount the directory finds no file, or an earlier run's file on its own disk with another token.
"""
from __future__ import annotations

import json
import os
import secrets
import socket
import time
from dataclasses import dataclass
from pathlib import Path

SENTINEL = "sentinel.json"


@dataclass(frozen=True)
class SentinelCheck:
    """What a worker checks: this file holds this token."""

    path: str
    token: str


def write_sentinel(study_dir: Path) -> SentinelCheck:
    """A fresh token for this driver run, written whole (temporary name, then rename)."""
    token = secrets.token_hex(16)
    path = Path(study_dir) / SENTINEL
    temporary = path.with_name(f".{SENTINEL}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps({"token": token, "host": socket.gethostname(), "pid": os.getpid(),
                                     "written": time.time()}) + "\n", encoding="utf-8")
    os.replace(temporary, path)
    return SentinelCheck(path=str(path), token=token)


def sentinel_problem(check: SentinelCheck) -> str | None:
    """None when this machine sees the driver's sentinel; else what is wrong, for the user."""
    path = Path(check.path)
    advice = ("Every node must mount the study directory at the same path; give --out an s3:// or gs:// URL, or a "
              "path on a file system all nodes mount (then --shared-dir)")
    try:
        written = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return (f"cannot see the study directory {path.parent}: the driver's {SENTINEL} is not there on this node, "
                f"so it is not shared with the driver. {advice}.")
    except (OSError, ValueError) as problem:
        return f"cannot read {path} on this node ({problem}). {advice}."
    if not isinstance(written, dict) or written.get("token") != check.token:
        return (f"{path.parent} on this node is another directory than the driver's: its {SENTINEL} holds another "
                f"token (a copy on this node's own disk, from {written.get('host') if isinstance(written, dict) else '?'}"
                f"). {advice}.")
    return None


def working_dir_copy(path: Path) -> Path | None:
    """The Ray job working-directory copy `path` lies in, if any (Ray unpacks `--working-dir` under
    <ray temp>/session_*/runtime_resources/working_dir_files/ and deletes it when done)."""
    parts = Path(os.path.abspath(path)).parts
    for i, part in enumerate(parts[:-1]):
        if part == "runtime_resources" and parts[i + 1] == "working_dir_files":
            return Path(*parts[: i + 3]) if len(parts) > i + 2 else Path(*parts[: i + 2])
    return None


def local_dir_refusal(study_dir: Path, on_cluster: bool, shared: bool) -> str | None:
    """Why a local study directory is refused before anything runs; None when it is accepted."""
    copy = working_dir_copy(study_dir)
    if copy is not None:
        return (f"the study directory {study_dir} lies inside Ray's temporary copy of the job's working directory "
                f"({copy}), which Ray deletes when the job ends; each submission gets a new copy, so nothing would "
                "resume either. Give --out an s3:// or gs:// URL, or an absolute path on a file system every node "
                "mounts (with --shared-dir)")
    if on_cluster and not shared:
        return (f"the study directory {study_dir} is a local path, and this run joins a Ray cluster: workers on other "
                "nodes would write masks, statistics and models to their own node's disk, which goes when the node "
                "does (an autoscaler removes idle workers), and no warning could say so on a cluster that has only a "
                "head at start-up. Give --out an s3:// or gs:// URL (pip install '.[cloud]'), or a path every node "
                "mounts at the same place and add --shared-dir (each worker then checks that it sees it)")
    return None
