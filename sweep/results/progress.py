"""One summary of a study's progress, drawn live by the driver and printed by `sweep status`."""
from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field


@dataclass
class Summary:
    total: int  # trials in the plan
    done: int  # finished, this run or earlier
    running: int
    failed: int  # gave up after their retries
    left: int  # neither finished nor failed nor running
    eta_s: float | None = None
    actors: list[dict] = field(default_factory=list)  # {"actor", "model", "busy"}

    def bar(self, width: int = 24) -> str:
        filled = int(width * self.done / self.total) if self.total else width
        return "#" * filled + "." * (width - filled)


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def format_summary(summary: Summary, with_actors: bool = True) -> str:
    line = (f"[{summary.bar()}] {summary.done}/{summary.total} done, {summary.running} running, "
            f"{summary.failed} failed, {summary.left} left, ETA {format_duration(summary.eta_s)}")
    if with_actors and summary.actors:
        held = " ".join(f"#{a['actor']}:{a.get('model') or '-'}{'*' if a.get('busy') else ''}" for a in summary.actors)
        line += f" | actors {held}"
    return line


# -- the ETA per model ------------------------------------------------------------------------------------
# Trials of different models differ by an order of magnitude (a 70B trial takes ten times an 8B one), so
# each model gets its own rate and its own remaining work, and the study's ETA is put together from them
# (docs/status.md, "How the ETA is computed").

MEASURED, ESTIMATED, UNKNOWN = "measured", "estimated", "unknown"


@dataclass(frozen=True)
class Seed:
    """A model's seconds per trial before any of its trials finished: `sweep plan --estimate`'s rate, or
    None with why there is none (a hub config not cached here, a model on CPU)."""

    seconds: float | None
    note: str = ""


@dataclass(frozen=True)
class ModelWork:
    """One model's trials as the plan and the logs count them."""

    model: str
    total: int = 0
    done: int = 0
    failed: int = 0  # gave up
    left: int = 0  # not started
    # seconds each running trial has run; 0.0 while its actor still loads the model, None when unknown
    running: tuple[float | None, ...] = ()
    durations: tuple[float, ...] = ()  # measured seconds of its finished trials
    actors: int = 0  # actors holding or working on this model now
    pool: str = ""  # models of one pool share actors (the scheduler gives an idle actor any model of its shape)


@dataclass(frozen=True)
class Rate:
    seconds: float | None  # per trial
    basis: str  # MEASURED, ESTIMATED or UNKNOWN
    samples: int = 0  # finished trials measured (MEASURED)
    note: str = ""

    def describe(self) -> str:
        if self.basis == MEASURED:
            return f"measured, n={self.samples}"
        return self.basis


@dataclass(frozen=True)
class ModelEta:
    work: ModelWork
    rate: Rate
    work_s: float | None  # actor-seconds left: trials left plus what the running ones still need
    eta_s: float | None  # work_s over the actors on it now; None without a rate or without an actor

    @property
    def model(self) -> str:
        return self.work.model

    @property
    def unfinished(self) -> int:
        return self.work.left + len(self.work.running)


@dataclass(frozen=True)
class StudyEta:
    eta_s: float | None  # None: no actor, or some model with work left has no rate
    at_least_s: float | None  # the same over the models that have a rate: a lower bound when eta_s is None
    actors: int
    models: tuple[ModelEta, ...]
    unknown: tuple[str, ...] = ()  # models with work left and no rate


def trial_rate(durations: Sequence[float], seed: Seed | None = None) -> Rate:
    """Seconds per trial: the mean of the model's measured trials, else its seed, else unknown.

    The mean, not the median: the ETA is a sum over the trials left, whose expectation is count x mean,
    and one model's trials mix methods of different cost (a dense baseline evaluates only; SparseGPT
    takes longer than Wanda), where a median would settle on one method's time."""
    measured = [float(d) for d in durations if d > 0]  # 0: a record written before `seconds` existed
    if measured:
        return Rate(sum(measured) / len(measured), MEASURED, len(measured))
    if seed is not None and seed.seconds is not None and seed.seconds > 0:
        return Rate(seed.seconds, ESTIMATED, 0, seed.note)
    return Rate(None, UNKNOWN, 0, seed.note if seed is not None else "no trial finished yet")


def remaining_seconds(per_trial: float, left: int, running: Sequence[float | None]) -> float:
    """Actor-seconds left: a whole trial for each one not started, and for each running one what it has
    not yet run (none once it has overrun the rate; half a trial when its start is unknown)."""
    still = sum(per_trial / 2 if elapsed is None else max(per_trial - elapsed, 0.0) for elapsed in running)
    return per_trial * left + still


def model_eta(work: ModelWork, seed: Seed | None = None) -> ModelEta:
    rate = trial_rate(work.durations, seed)
    if not work.left and not work.running:
        return ModelEta(work, rate, 0.0, 0.0)
    if rate.seconds is None:
        return ModelEta(work, rate, None, None)
    work_s = remaining_seconds(rate.seconds, work.left, work.running)
    return ModelEta(work, rate, work_s, work_s / work.actors if work.actors > 0 else None)


def pool_eta(models: Sequence[ModelEta], actors: int) -> float | None:
    """The time `actors` shared by `models` (with rates) need: the actor-seconds left over the actors,
    but never less than any one model needs alone, since one model's trials keep at most one actor per
    unfinished trial busy (its last trial runs on one actor however many are idle)."""
    busy = [m for m in models if m.work_s]
    if not busy:
        return 0.0
    if actors <= 0:
        return None
    pooled = sum(m.work_s for m in busy) / actors
    longest = max(m.work_s / max(1, min(actors, m.unfinished)) for m in busy)
    return max(pooled, longest)


def study_eta(works: Sequence[ModelWork], seeds: Mapping[str, Seed] | None = None,
              pool_actors: Mapping[str, int] | None = None) -> StudyEta:
    """Per model its rate, remaining work and ETA at its current actors; for the study, per pool of
    actors the `pool_eta` of its models, and the study's is the longest pool's (pools run side by side,
    as actors of different shapes never swap). `pool_actors`: the actors of each pool now (default:
    the sum of its models' actors; pass it to count actors that hold no model yet)."""
    seeds = seeds or {}
    models = tuple(model_eta(w, seeds.get(w.model)) for w in works)
    pools: dict[str, list[ModelEta]] = {}
    for m in models:
        pools.setdefault(m.work.pool, []).append(m)
    actors = {pool: sum(m.work.actors for m in members) for pool, members in pools.items()}
    actors.update({pool: n for pool, n in (pool_actors or {}).items() if pool in pools})
    unknown = tuple(m.model for m in models if m.work_s is None)
    per_pool = [pool_eta([m for m in members if m.work_s is not None], actors[pool])
                for pool, members in pools.items()]
    known = None if any(t is None for t in per_pool) else max(per_pool, default=0.0)
    return StudyEta(eta_s=None if unknown else known, at_least_s=known, actors=sum(actors.values()),
                    models=models, unknown=unknown)


@dataclass
class _Tally:
    total: int = 0
    done: int = 0
    failed: int = 0
    left: int = 0
    running: list[float | None] = field(default_factory=list)
    durations: list[float] = field(default_factory=list)


def model_work(trials: Iterable[tuple[str, str]], done: Mapping[str, float], failed: Iterable[str],
               running: Mapping[str, float | None], actors: Mapping[str, int],
               pools: Mapping[str, str] | None = None) -> list[ModelWork]:
    """The ModelWork of each model, in plan order, from plain facts: `trials` (key, model label) of the
    plan; `done` key -> measured seconds of finished trials; `failed` keys that gave up; `running` key ->
    seconds it has run; `actors` model -> actors on it now; `pools` model -> its pool of actors."""
    failed = set(failed)
    tallies: dict[str, _Tally] = {}
    for key, model in trials:
        tally = tallies.setdefault(model, _Tally())
        tally.total += 1
        if key in done:  # finished beats failed, as in study_state
            tally.done += 1
            tally.durations.append(done[key])
        elif key in running:
            tally.running.append(running[key])
        elif key in failed:
            tally.failed += 1
        else:
            tally.left += 1
    return [ModelWork(model=model, total=t.total, done=t.done, failed=t.failed, left=t.left,
                      running=tuple(t.running), durations=tuple(t.durations), actors=actors.get(model, 0),
                      pool=(pools or {}).get(model, "")) for model, t in tallies.items()]


class LiveProgress:
    """The driver's live progress. On a terminal, a `rich` live region redrawn in place, with event lines
    (a trial finished, failed) printed above it; rich redraws every line the region took, so a summary
    longer than the terminal is wide does not leave wrapped remnants behind (a carriage return would). On
    a pipe or log file, a summary line at most every `every_s` seconds between the event lines."""

    def __init__(self, stream=None, every_s: float = 30.0, enabled: bool = True):
        self.stream = stream or sys.stdout
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.enabled = enabled
        self.every_s = every_s
        self._last_line = ""
        self._last_print = float("-inf")
        self._live = None  # rich.live.Live while a summary is shown on a terminal

    def _region(self):
        if self._live is None:
            from rich.console import Console  # deferred: only a terminal draws with rich
            from rich.live import Live

            console = Console(file=self.stream, force_terminal=True, highlight=False, soft_wrap=False)
            self._live = Live(console=console, auto_refresh=False, transient=False, redirect_stdout=False,
                              redirect_stderr=False)
            self._live.start()
        return self._live

    def log(self, line: str) -> None:
        if self._live is not None:
            self._live.console.print(line, markup=False, highlight=False, soft_wrap=True)
            self._live.refresh()
            return
        self.stream.write(line + "\n")
        self.stream.flush()

    def update(self, summary: Summary) -> None:
        if not self.enabled:
            return
        line = format_summary(summary)
        if self.tty:
            if line != self._last_line:
                from rich.text import Text

                self._region().update(Text(line), refresh=True)
                self._last_line = line
        elif time.monotonic() - self._last_print >= self.every_s and line != self._last_line:
            self.stream.write(line + "\n")
            self.stream.flush()
            self._last_line, self._last_print = line, time.monotonic()

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()  # leaves the last summary on screen
            self._live = None
        self._last_line = ""
