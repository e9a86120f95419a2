"""What a worker actor answers the scheduler, for `load` and for `run` alike. A failure is data, never
an exception across Ray: the scheduler decides from `retryable` and `model_fatal` what happens next."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class WorkerReply:
    ok: bool = False
    loaded: bool = False  # this call loaded a model (counted as a model load)
    model: str | None = None  # the model the actor holds after the call
    seconds: float = 0.0  # wall time of the call on the worker
    load: dict[str, Any] | None = None  # what loading measured, when this call loaded
    result: dict[str, Any] | None = None  # run: the trial's result (engine.trial's record)
    error: str | None = None  # "Type: message"
    traceback: str = ""
    retryable: bool = True  # False: the same trial would fail the same way again
    model_fatal: bool = False  # the model can never load on an actor of this shape

    def failed(self, err: BaseException, traceback: str, retryable: bool, model_fatal: bool = False) -> None:
        self.ok = False
        self.error = f"{type(err).__name__}: {err}"
        self.traceback = traceback
        self.retryable = retryable
        self.model_fatal = model_fatal
