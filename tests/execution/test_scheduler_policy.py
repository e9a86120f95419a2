"""The scheduler's dispatch policy without Ray (which actor takes which model's work), and the workers' fault injection."""
from __future__ import annotations

import json

from sweep.execution.scheduler import Job, Scheduler, SchedulerConfig, Shape, _Slot
from sweep.execution.worker import injected_fault

CPU = Shape(gpus=0, cpus=1)
GPU4 = Shape(gpus=4, cpus=8)


def make_scheduler(jobs: list[Job]) -> Scheduler:
    return Scheduler(actor_class=None, jobs=jobs, config=SchedulerConfig(), emit=lambda e: None,
                     capacity=lambda shape: 2)


def slot(scheduler: Scheduler, number: int, model: str | None, shape: Shape = CPU, busy_with: Job | None = None):
    s = _Slot(id=number, handle=None, shape=shape, info_ref=None, info={}, model=model, job=busy_with)
    scheduler.slots[number] = s
    return s


def jobs_for(model: str, n: int, shape: Shape = CPU) -> list[Job]:
    return [Job(key=f"{model}-{i}", name=f"{model}-{i}", model=model, shape=shape, payload=None) for i in range(n)]


def test_an_actor_keeps_its_model_while_that_queue_has_work():
    s = make_scheduler(jobs_for("a", 3) + jobs_for("b", 5))
    assert s._pick_model(slot(s, 1, "a")) == "a"


def test_a_fresh_actor_takes_a_model_nobody_holds_before_the_longest_queue():
    s = make_scheduler(jobs_for("a", 9) + jobs_for("b", 2))
    slot(s, 1, "a")
    assert s._pick_model(slot(s, 2, None)) == "b"


def test_an_actor_switches_to_the_longest_queue_when_its_own_is_empty():
    s = make_scheduler(jobs_for("b", 2) + jobs_for("c", 6))
    slot(s, 1, "b")
    slot(s, 2, "c")
    assert s._pick_model(slot(s, 3, "a")) == "c"


def test_an_actor_only_takes_models_of_its_shape():
    s = make_scheduler(jobs_for("small", 3) + jobs_for("big", 3, GPU4))
    assert s._pick_model(slot(s, 1, None, shape=GPU4)) == "big"
    s.queues["big"].clear()
    assert s._pick_model(slot(s, 2, None, shape=GPU4)) is None


def test_counts_of_queued_work_per_shape():
    s = make_scheduler(jobs_for("small", 3) + jobs_for("big", 2, GPU4))
    assert s.queued() == 5 and s.queued(CPU) == 3 and s.queued(GPU4) == 2 and not s.done()


def test_fault_injection_matches_name_and_attempt(monkeypatch):
    assert injected_fault("m.wanda.cal-en", 1) is None
    monkeypatch.setenv("SWEEP_INJECT_FAULTS", json.dumps([{"match": "cal-en", "kind": "exit", "attempts": 2}]))
    assert injected_fault("m.wanda.cal-en", 1) == "exit" and injected_fault("m.wanda.cal-en", 2) == "exit"
    assert injected_fault("m.wanda.cal-en", 3) is None and injected_fault("m.wanda.cal-de", 1) is None
