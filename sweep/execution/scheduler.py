"""Dispatching jobs onto Ray actors with model affinity, retries, timeouts and dead-actor replacement.

The scheduler knows nothing of pruning: a job is a key, the model it needs loaded (its affinity group),
the actor shape that model needs, and an opaque payload the actor's `run` method understands. Actors
answer `run(job_payload, model, attempt)` with a `WorkerReply` (sweep.execution.replies), and `info()`
with where they run.

Policy
- One queue per model. An idle actor takes the next job for the model it holds; when that queue is
  empty it switches to the model with the most queued jobs that no other actor holds (else the longest
  queue), so two actors on two models load each model once.
- Actors are sized by shape (GPUs, CPUs per replica) and created while their shape has queued work and
  the cluster has room; an actor whose shape has no work left is released so its GPUs serve others.
- A job that raises is retried up to `retries` times; a job whose actor or node dies is re-queued and
  the actor replaced; a job past `timeout_s` has its actor killed, and is retried like a failure. The
  timeout covers the trial, not the model load before it (a load is its own call).
  Every attempt counts, so a trial that kills its worker every time ends as failed instead of looping.
"""
from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError

from sweep.store.records import (
    ActorFailed,
    ActorLost,
    ActorReleased,
    ActorStarted,
    Event,
    ModelLoaded,
    TrialAbandoned,
    TrialFailed,
    TrialFinished,
    TrialStarted,
    Unschedulable,
)


@dataclass(frozen=True)
class Shape:
    gpus: float
    cpus: float
    accelerator: str | None = None  # Ray accelerator type (H100, A10G, ...) the GPUs must be

    def describe(self) -> str:
        gpus = f"{self.gpus:g} {self.accelerator} GPU" if self.accelerator else f"{self.gpus:g} GPU"
        return f"{gpus} + {self.cpus:g} CPU" if self.gpus else f"{self.cpus:g} CPU"


@dataclass
class Job:
    key: str
    name: str
    model: str  # affinity group: the model the actor must hold
    shape: Shape
    payload: Any
    earlier_attempts: int = 0  # started in earlier driver runs (reported, not counted against retries)
    attempts: int = 0  # made in this run


@dataclass
class SchedulerConfig:
    retries: int = 2
    timeout_s: float | None = None
    max_actors: int | None = None
    poll_s: float = 0.5
    max_start_failures: int = 5  # actors that die before their first job; more means a broken setup
    # An actor that cannot be placed for this long while no live node could hold its shape makes its
    # model's trials fail as unschedulable (an autoscaler has had that long to add a node). None: wait.
    placement_timeout_s: float | None = 900.0


class SchedulingError(RuntimeError):
    pass


class ActorRefused(SchedulingError):
    """A worker's start-up check found that it cannot work where it was placed (its `info()` answered a
    `refusal`). The scheduler stops handing out work and starting actors, lets the trials in flight on
    other actors finish, then raises this: every actor on that node would answer the same."""


@dataclass
class _Slot:
    id: int
    handle: Any
    shape: Shape
    info_ref: Any
    info: dict | None = None
    model: str | None = None  # the model it holds (after its last job)
    job: Job | None = None
    ref: Any = None
    loading: bool = False  # `ref` is a model load (not under the trial timeout), then the trial runs
    since: float = 0.0
    created: float = field(default_factory=time.monotonic)

    def describe(self) -> dict:
        """Where this actor runs, as the fields of an OnActor event."""
        info = self.info or {}
        return {"actor": self.id, "node": info.get("node"), "host": info.get("host"), "gpus": info.get("gpus"),
                "pid": info.get("pid")}


@dataclass
class Counters:
    finished: int = 0
    failed: int = 0  # jobs that ended failed (retries exhausted)
    attempts_failed: int = 0
    actors_started: int = 0
    actors_lost: int = 0
    model_loads: int = 0
    loads_by_model: dict[str, int] = field(default_factory=dict)


Emit = Callable[[Event], None]


class Scheduler:
    def __init__(self, actor_class: Any, jobs: list[Job], config: SchedulerConfig, emit: Emit,
                 actor_options: dict | None = None, capacity: Callable[[Shape], int] | None = None,
                 actor_args: tuple = ()):
        self.actor_class = actor_class
        self.actor_args = actor_args
        self.config = config
        self.emit = emit
        self.actor_options = actor_options or {}
        self._capacity_of = capacity or cluster_capacity
        self._capacity_seen: dict[Shape, tuple[float, int]] = {}
        self.queues: dict[str, deque[Job]] = {}
        for job in jobs:
            self.queues.setdefault(job.model, deque()).append(job)
        self.shapes = {job.model: job.shape for job in jobs}
        self.slots: dict[int, _Slot] = {}
        self.counters = Counters()
        self._next_id = 0
        self._start_failures = 0
        self._stopping = False
        self._refusal: str | None = None  # the first actor's refusal: drain, then raise ActorRefused
        self.unschedulable: set[Shape] = set()

    # -- state ---------------------------------------------------------------------------------
    def queued(self, shape: Shape | None = None) -> int:
        return sum(len(q) for m, q in self.queues.items() if shape is None or self.shapes[m] == shape)

    def running(self) -> list[_Slot]:
        return [s for s in self.slots.values() if s.job is not None]

    def done(self) -> bool:
        return self.queued() == 0 and not self.running()

    def stop(self) -> None:
        """Stops handing out work; `run` returns once the jobs in flight are abandoned."""
        self._stopping = True

    def holdings(self) -> list[dict]:
        return [{"actor": s.id, "model": s.model, "busy": s.job is not None, "starting": s.info is None}
                for s in sorted(self.slots.values(), key=lambda s: s.id)]

    # -- the loop ------------------------------------------------------------------------------
    def run(self, on_tick: Callable[[Scheduler], None] | None = None) -> Counters:
        try:
            while not self.done() and not self._stopping and not (self._refusal and not self.running()):
                self._size_pool()
                self._dispatch()
                waiting = {s.ref: s for s in self.slots.values() if s.ref is not None}
                waiting.update({s.info_ref: s for s in self.slots.values() if s.info is None})
                if waiting:
                    ready, _ = ray.wait(list(waiting), num_returns=1, timeout=self.config.poll_s)
                    # drain whatever else is already complete without waiting again
                    if ready and len(waiting) > 1:
                        more, _ = ray.wait([r for r in waiting if r not in ready], num_returns=len(waiting) - 1,
                                           timeout=0)
                        ready += more
                    for ref in ready:
                        slot = waiting[ref]
                        if ref is slot.info_ref and slot.info is None:
                            self._on_started(slot)
                        else:
                            self._on_reply(slot)
                else:
                    time.sleep(self.config.poll_s)
                self._check_timeouts()
                if on_tick is not None:
                    on_tick(self)
        finally:
            self._release_all()
        if self._refusal:
            raise ActorRefused(self._refusal)
        return self.counters

    # -- actors ----------------------------------------------------------------------------------
    def capacity(self, shape: Shape) -> int:
        """The cluster's room for this shape, asked of Ray at most every 5 s (nodes come and go)."""
        now = time.monotonic()
        seen = self._capacity_seen.get(shape)
        if seen is None or now - seen[0] > 5.0:
            seen = (now, self._capacity_of(shape))
            self._capacity_seen[shape] = seen
        return seen[1]

    def _size_pool(self) -> None:
        if self._refusal:
            return
        total_cap = self.config.max_actors or math.inf
        for shape in {self.shapes[m] for m, q in self.queues.items() if q} - self.unschedulable:
            mine = [s for s in self.slots.values() if s.shape == shape]
            idle_or_starting = sum(1 for s in mine if s.job is None)
            want = min(self.queued(shape) + len(mine) - idle_or_starting, self.capacity(shape))
            want = max(want, 1)  # with no room yet, one pending actor lets an autoscaler add a node
            while len(mine) < want and len(self.slots) < total_cap:
                mine.append(self._start_actor(shape))
        # Actors whose shape has nothing queued give their resources back.
        for slot in list(self.slots.values()):
            if slot.job is None and slot.info is not None and self.queued(slot.shape) == 0:
                self._release(slot, "no work left for its shape")

    def _start_actor(self, shape: Shape) -> _Slot:
        options = {**self.actor_options, "num_cpus": shape.cpus, "num_gpus": shape.gpus, "max_restarts": 0,
                   "max_task_retries": 0}
        if shape.accelerator:
            options["accelerator_type"] = shape.accelerator
        handle = self.actor_class.options(**options).remote(*self.actor_args)
        self._next_id += 1
        slot = _Slot(id=self._next_id, handle=handle, shape=shape, info_ref=handle.info.remote())
        self.slots[slot.id] = slot
        self.counters.actors_started += 1
        return slot

    def _on_started(self, slot: _Slot) -> None:
        try:
            slot.info = ray.get(slot.info_ref)
        except (RayActorError, RayTaskError) as err:
            self._start_failures += 1
            del self.slots[slot.id]
            self.emit(ActorFailed(actor=slot.id, error=_first_line(err)))
            if self._start_failures > self.config.max_start_failures:
                raise SchedulingError(f"{self._start_failures} worker actors died before running anything; "
                                      f"the last said: {_first_line(err)}") from err
            return
        self._start_failures = 0
        self.emit(ActorStarted(**slot.describe(), shape=slot.shape.describe(), versions=slot.info.get("versions") or {}))
        refusal = slot.info.get("refusal")
        if refusal:
            self._release(slot, f"refused to work: {refusal}")
            if self._refusal is None:
                self._refusal = f"worker #{slot.id} on {slot.info.get('host')} (node {slot.info.get('node')}): {refusal}"

    def _release(self, slot: _Slot, why: str) -> None:
        ray.kill(slot.handle, no_restart=True)
        del self.slots[slot.id]
        self.emit(ActorReleased(actor=slot.id, why=why, model=slot.model))

    def _release_all(self) -> None:
        for slot in list(self.slots.values()):
            if slot.job is not None:
                self.emit(TrialAbandoned(key=slot.job.key, name=slot.job.name, **slot.describe()))
            ray.kill(slot.handle, no_restart=True)
        self.slots.clear()

    # -- dispatch ----------------------------------------------------------------------------------
    def _dispatch(self) -> None:
        if self._stopping or self._refusal:
            return
        for slot in sorted(self.slots.values(), key=lambda s: s.id):
            if slot.job is not None or slot.info is None:
                continue
            model = self._pick_model(slot)
            if model is None:
                continue
            job = self.queues[model].popleft()
            job.attempts += 1
            slot.job, slot.since = job, time.monotonic()
            self.emit(TrialStarted(key=job.key, name=job.name, model=job.model,
                                   attempt=job.earlier_attempts + job.attempts, **slot.describe()))
            if slot.model != job.model:
                # Loading first, as its own call: a 70B load can take longer than a trial's timeout.
                slot.loading = True
                slot.ref = slot.handle.load.remote(job.payload, job.model)
            else:
                self._run_on(slot)

    def _run_on(self, slot: _Slot) -> None:
        job = slot.job
        slot.loading, slot.since = False, time.monotonic()
        slot.ref = slot.handle.run.remote(job.payload, job.model, job.earlier_attempts + job.attempts)

    def _pick_model(self, slot: _Slot) -> str | None:
        if slot.model is not None and self.queues.get(slot.model):
            return slot.model
        candidates = [m for m, q in self.queues.items() if q and self.shapes[m] == slot.shape]
        if not candidates:
            return None
        held = {s.model for s in self.slots.values() if s is not slot} | {
            s.job.model for s in self.slots.values() if s.job is not None}
        return max(candidates, key=lambda m: (m not in held, len(self.queues[m])))

    # -- replies -----------------------------------------------------------------------------------
    def _on_reply(self, slot: _Slot) -> None:
        job, ref, loading = slot.job, slot.ref, slot.loading
        slot.job, slot.ref, slot.loading = None, None, False
        seconds = time.monotonic() - slot.since
        where = slot.describe()
        try:
            reply = ray.get(ref)
        except RayActorError as err:
            self.counters.actors_lost += 1
            del self.slots[slot.id]
            self.emit(ActorLost(**where, model=slot.model, error=_first_line(err)))
            self._attempt_failed(job, where, f"worker died while running it: {_first_line(err)}", "", seconds)
            return
        except RayTaskError as err:
            self._attempt_failed(job, where, _first_line(err), str(err), seconds)
            return
        if reply.loaded:
            self.counters.model_loads += 1
            self.counters.loads_by_model[job.model] = self.counters.loads_by_model.get(job.model, 0) + 1
        slot.model = reply.model
        if loading:
            if reply.ok:
                self.emit(ModelLoaded(model=job.model, seconds=seconds, **where, load=reply.load))
                slot.job = job
                self._run_on(slot)
            else:
                why = f"loading {job.model} failed: {reply.error}"
                self._attempt_failed(job, where, why, reply.traceback, seconds, reply.retryable)
                if reply.model_fatal:  # the model cannot load on such an actor: no trial of it can run
                    self._give_up_queued([job.model], why)
            return
        if reply.ok:
            self.counters.finished += 1
            self.emit(TrialFinished(key=job.key, name=job.name, model=job.model,
                                    attempt=job.earlier_attempts + job.attempts, seconds=seconds, **where,
                                    result=reply.result, load=reply.load, worker_seconds=reply.seconds,
                                    versions=(slot.info or {}).get("versions")))
        else:
            self._attempt_failed(job, where, reply.error or "unknown error", reply.traceback, seconds,
                                 reply.retryable)

    def _attempt_failed(self, job: Job, where: dict, error: str, traceback: str, seconds: float,
                        retryable: bool = True) -> None:
        self.counters.attempts_failed += 1
        final = not retryable or job.attempts > self.config.retries
        if final:
            self.counters.failed += 1
        else:
            self.queues[job.model].append(job)
        self.emit(TrialFailed(key=job.key, name=job.name, model=job.model,
                              attempt=job.earlier_attempts + job.attempts, final=final, error=error,
                              traceback=traceback, seconds=seconds, **where))

    def _check_placement(self) -> None:
        limit = self.config.placement_timeout_s
        if limit is None:
            return
        now = time.monotonic()
        for slot in list(self.slots.values()):
            if slot.info is not None or now - slot.created <= limit or self.capacity(slot.shape) > 0:
                continue
            shape = slot.shape
            self.unschedulable.add(shape)
            for other in [s for s in self.slots.values() if s.shape == shape and s.info is None]:
                ray.kill(other.handle, no_restart=True)
                del self.slots[other.id]
            why = (f"unschedulable: no live node can hold an actor of {shape.describe()} ({largest_node(shape)}); "
                   f"waited {limit:g} s for one. Lower the model's gpus, or add nodes that large.")
            self.emit(Unschedulable(shape=shape.describe(), error=why))
            self._give_up_queued([m for m in self.queues if self.shapes[m] == shape], why)

    def _give_up_queued(self, models: list[str], why: str) -> None:
        """Fails, without running them, every queued trial of `models`."""
        for model in models:
            queue = self.queues[model]
            while queue:
                job = queue.popleft()
                job.attempts += 1
                self.counters.failed += 1
                self.emit(TrialFailed(key=job.key, name=job.name, model=job.model,
                                      attempt=job.earlier_attempts + job.attempts, final=True, error=why))

    def _check_timeouts(self) -> None:
        self._check_placement()
        limit = self.config.timeout_s
        if limit is None:
            return
        now = time.monotonic()
        for slot in list(self.slots.values()):
            if slot.job is not None and not slot.loading and now - slot.since > limit:
                job, where = slot.job, slot.describe()
                ray.kill(slot.handle, no_restart=True)
                del self.slots[slot.id]
                self.emit(ActorReleased(actor=slot.id, why="trial timed out", model=slot.model))
                self._attempt_failed(job, where, f"timed out after {limit:g} s; its worker was killed", "", now - slot.since)


def cluster_capacity(shape: Shape) -> int:
    """How many actors of this shape the cluster's live nodes could hold at once, were they empty. Per
    node: a 4-GPU actor does not fit two nodes of 2 GPUs."""
    return sum(node_capacity(node.get("Resources") or {}, shape) for node in ray.nodes() if node.get("Alive"))


def node_capacity(resources: dict, shape: Shape) -> int:
    if shape.accelerator and not resources.get(f"accelerator_type:{shape.accelerator}"):
        return 0
    fits = []
    if shape.gpus:
        fits.append(int(resources.get("GPU", 0) // shape.gpus))
    if shape.cpus:
        fits.append(int(resources.get("CPU", 0) // shape.cpus))
    return min(fits) if fits else 1


def largest_node(shape: Shape) -> str:
    """The biggest live node, in the resource the shape is short of (for error messages)."""
    key = "GPU" if shape.gpus else "CPU"
    nodes = [n.get("Resources") or {} for n in ray.nodes() if n.get("Alive")]
    if shape.accelerator:
        typed = [r for r in nodes if r.get(f"accelerator_type:{shape.accelerator}")]
        if not typed:
            return f"no live node has {shape.accelerator} GPUs"
        nodes = typed
    most = max((float(r.get(key, 0)) for r in nodes), default=0.0)
    kind = f"{shape.accelerator} " if shape.accelerator else ""
    return f"the largest live {kind}node has {most:g} {key}s"


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:500] if text else type(err).__name__


__all__ = ["ActorRefused", "Job", "Shape", "Scheduler", "SchedulerConfig", "SchedulingError", "Counters",
           "cluster_capacity"]
