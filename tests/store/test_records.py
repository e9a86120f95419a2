"""The typed records of a study directory: every kind round-trips through its JSON, and what an older
or newer version wrote still reads."""
from __future__ import annotations

import json

import pytest

from sweep.store.records import (
    EVENT_KINDS,
    PlanRecord,
    TrialFields,
    TrialFinished,
    TrialStarted,
    UnknownEvent,
    parse_event,
)
from sweep.store.study_store import study_state


def test_every_event_kind_round_trips_through_json():
    fields = TrialFields(model="m", pruner="wanda", sparsity="2:4", calibration="en", seed=1, dense=False)
    for kind, cls in EVENT_KINDS.items():
        event = cls(time=12.5, run="r1")
        if isinstance(event, (TrialStarted, TrialFinished)):
            event = cls(time=12.5, run="r1", key="k", trial=fields)
        line = json.dumps(event.to_json())
        back = parse_event(json.loads(line))
        assert back == event and type(back) is cls and json.loads(line)["event"] == kind


def test_a_finished_event_keeps_its_result_out_of_the_log():
    event = TrialFinished(key="k", result={"metrics": [1]}, metrics=[{"value": 1.0}])
    stored = event.to_json()
    assert "result" not in stored and stored["metrics"] == [{"value": 1.0}]
    assert parse_event({**stored, "result": {"x": 1}}).result is None  # never read back either


def test_older_and_newer_lines_still_read():
    old = parse_event({"event": "failed", "key": "a", "error": "boom"})  # no attempt, final, run, time
    assert (old.key, old.attempt, old.final, old.run, old.time) == ("a", 1, True, "", 0.0)
    newer = parse_event({"event": "finished", "key": "b", "a_field_from_later": 1})
    assert isinstance(newer, TrialFinished) and newer.key == "b"
    unknown = parse_event({"event": "checkpointed", "key": "c", "time": 3})
    assert isinstance(unknown, UnknownEvent) and unknown.kind == "checkpointed" and unknown.time == 3.0
    assert unknown.to_json() == {"event": "checkpointed", "key": "c", "time": 3}


def test_plan_record_round_trips_and_reads_a_bare_plan():
    plan = PlanRecord.from_json({"study": "s", "languages": ["en"], "analyses": {"lape": {"enabled": True}},
                                 "trials": [{"key": "k", "name": "n", "model": "m", "pruner": "dense",
                                             "sparsity": "0", "calibration": None, "seed": None, "dense": True}]})
    assert PlanRecord.from_json(json.loads(json.dumps(plan.to_json()))) == plan
    assert plan.keys == {"k"} and plan.analysis_enabled("lape") and not plan.analysis_enabled("masks")
    bare = PlanRecord.from_json({"trials": [{"key": "x"}]})
    assert bare.trials[0].name == "x" and bare.languages == () and bare.study == ""


def test_the_state_refuses_raw_dicts_instead_of_reading_nothing():
    with pytest.raises(TypeError, match="typed events"):
        study_state([{"event": "finished", "key": "a"}])
    assert set(study_state([parse_event({"event": "finished", "key": "a"})]).finished) == {"a"}
