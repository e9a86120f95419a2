"""The exit codes of every `sweep` command, in one place: the CLI returns them and the driver reports
them in its outcome, so scripts can tell a bad study from failed trials from a study another driver holds."""
from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    FAILED_TRIALS = 1  # some trial failed with its retries used up (or a prefetch item failed)
    INVALID = 2  # bad study file or arguments: nothing was started or written
    LOCKED = 3  # another driver holds the study directory
    STORE = 4  # the study directory could not be written
    INTERRUPTED = 130  # stopped by Ctrl-C / SIGTERM; run again to continue
