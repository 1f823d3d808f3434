"""Length history, prediction and update pacing (scheduling/lengths.py and its hooks)."""

from __future__ import annotations

import json

import pytest

from sortedrl.scheduling.config import SchedulerConfig
from sortedrl.scheduling.controller import Controller
from sortedrl.scheduling.lengths import LengthHistory, plan_wait
from sortedrl.scheduling.loop import run
from sortedrl.scheduling.state import PromptSpec
from tests.stepping_engine import SteppingEngine, UnitTrainer


def test_prediction_is_the_mean_of_the_longer_recorded_lengths():
    h = LengthHistory(cap=5000)
    assert h.predict("a") == 5000  # nothing seen: the cap
    for x in (100, 200, 300, 1000):
        h.record("a", x)
    assert h.predict("a") == 400
    assert h.predict("a", progress=250) == 650  # mean of 300 and 1000
    assert h.predict("a", progress=1500) == 3000  # past everything: as long again
    assert h.predict("a", progress=4000) == 5000  # ... up to the cap
    h.record("b", 50)
    assert h.predict("b") == 50  # its own record, not the others'
    assert h.predict("unseen") == (100 + 200 + 300 + 1000 + 50) / 5  # everything seen so far
    assert h.known("a") == 4 and h.known("unseen") == 0


def test_history_round_trips_through_json():
    h = LengthHistory(cap=100)
    for i in range(40):
        h.record(f"p{i % 3}", i + 1)
    g = LengthHistory(cap=100)
    g.load_state_dict(json.loads(json.dumps(h.state_dict())))
    assert g.state_dict() == h.state_dict()
    assert all(g.predict(f"p{i}", 7) == h.predict(f"p{i}", 7) for i in range(4))
    assert h.known("p0") == 14 and len(h.state_dict()["by_prompt"]["p1"]) == 13


def test_plan_wait_cost_model_worked_by_hand():
    # Capacity 4, two responses running that finish in 10 and 20 steps, nothing to refill:
    # waiting 10 steps leaves 2 slots idle (20 slot-steps) and saves 100 tokens.
    assert plan_wait([(10, 100)], [10, 20], 4, 0, 8) == (10, 1)
    assert plan_wait([(10, 15)], [10, 20], 4, 0, 8) is None  # 20 > 15: restarting is cheaper
    # A second group at 20 steps: 10 more steps with 3 idle slots (30) for 5 tokens: no.
    assert plan_wait([(10, 100), (20, 5)], [10, 20], 4, 0, 8) == (10, 1)
    # ... but worth it when it holds 40: gain 140 - 50 = 90 > 80.
    assert plan_wait([(10, 100), (20, 40)], [10, 20], 4, 0, 8) == (20, 2)
    assert plan_wait([(10, 100), (20, 40)], [10, 20], 4, 0, 1) == (10, 1)  # room for one
    # Work to refill the freed slots makes waiting free.
    assert plan_wait([(10, 1)], [10, 20], 4, 2, 8) == (10, 1)
    assert plan_wait([(50, 1)], [10, 20], 4, 2, 8) is None  # not once they run dry
    assert plan_wait([], [10], 4, 0, 8) is None
    assert plan_wait([(1, 100)], [1], 4, 0, 0) is None  # no room in the update


def _pacing_run(pacing: bool, pause: bool):
    # One response per prompt, an update per complete prompt, staleness limit 1. p1 runs 4
    # tokens; when p2 completes the second update, p1 holds 2 tokens of version 0 and would
    # be pushed past the limit; two more steps finish it.
    cfg = SchedulerConfig(
        policy="sorted",
        cache="keep",
        admission="fill",
        group_size=1,
        rollout_batch=3,
        update_batch=1,
        max_staleness=1,
        max_new_tokens=50,
        update_pacing=pacing,
    )
    lengths = {"p1": 4}
    engine = SteppingEngine(2, lambda p, i, a: lengths.get(p, 1))
    trainer = UnitTrainer()
    ctl = Controller(cfg, [PromptSpec(f"p{i}", 3) for i in range(6)])
    result = run(ctl, engine, trainer, pause_for_update=pause)
    return result.summary, [[g.prompt_id for g in b.groups] for b in trainer.batches]


@pytest.mark.parametrize("pause", [True, False])
def test_pacing_waits_for_a_group_about_to_complete(pause):
    plain, _ = _pacing_run(False, pause)
    assert plain["tokens_wasted"] > 0  # without pacing p1 is restarted
    paced, batches = _pacing_run(True, pause)
    # p1's 4 tokens are saved; p3, which completed during the wait, is trained two updates
    # later and its 1 token goes stale (the cost model does not count that knock-on effect).
    assert plain["tokens_wasted_by_reason"] == {"stale_partial": 4}
    assert paced["tokens_wasted_by_reason"] == {"stale_finished": 1}
    assert paced["max_staleness_trained"] <= 1
    assert sorted(p for b in batches for p in b) == [f"p{i}" for i in range(6)]
    assert batches[1] == ["p1"]  # trained in the update it would otherwise have missed


def test_longest_predicted_first_submits_the_long_prompt_first():
    # Epoch 0 records that p2 is long; in epoch 1 it is submitted first among fresh work.
    cfg = SchedulerConfig(
        policy="sorted",
        cache="keep",
        admission="round",
        group_size=2,
        rollout_batch=3,
        update_batch=3,
        max_new_tokens=100,
        submit_order="longest_predicted",
    )
    specs = [PromptSpec(f"p{i}", 3, epoch=e) for e in range(2) for i in range(3)]
    lengths = {"p0": 3, "p1": 5, "p2": 30}
    engine = SteppingEngine(2, lambda p, i, a, e: lengths[p], by_epoch=True)
    order: list[str] = []
    submit = engine.submit

    def spy(requests):
        order.extend(f"{r.prompt_id}@{r.epoch}" for r in requests)
        submit(requests)

    engine.submit = spy
    run(Controller(cfg, specs), engine, UnitTrainer())
    epoch1 = [x for x in order if x.endswith("@1")]
    assert epoch1[:2] == ["p2@1", "p2@1"]
    assert order[:2] == ["p0@0", "p0@0"]  # epoch 0: no history, admission order


@pytest.mark.parametrize("keyed_on_record", [True, False])
def test_history_follows_the_record_when_each_admission_has_its_own_prompt_id(keyed_on_record):
    # As `sortedrl train` over several epochs: every admission has its own prompt id, and the
    # record it comes from is named by record_id. Epoch 0 records that r2 is long; in epoch 1
    # its copy (another prompt id) is submitted first. Without a record id the epoch-1 copies
    # look unseen and go in admission order.
    cfg = SchedulerConfig(
        policy="sorted",
        cache="keep",
        admission="round",
        group_size=2,
        rollout_batch=3,
        update_batch=3,
        max_new_tokens=100,
        submit_order="longest_predicted",
    )
    specs = [
        PromptSpec(f"e{e}/p{i}", 3, epoch=e, record_id=f"r{i}" if keyed_on_record else None)
        for e in range(2)
        for i in range(3)
    ]
    lengths = {"p0": 3, "p1": 5, "p2": 30}
    engine = SteppingEngine(2, lambda p, i, a: lengths[p.split("/")[1]])
    order: list[str] = []
    submit = engine.submit

    def spy(requests):
        order.extend(r.prompt_id for r in requests)
        submit(requests)

    engine.submit = spy
    ctl = Controller(cfg, specs)
    run(ctl, engine, UnitTrainer())
    epoch1 = [x for x in order if x.startswith("e1/")]
    history = ctl.state_dict()["lengths"]["history"]["by_prompt"]
    if keyed_on_record:
        assert epoch1[:2] == ["e1/p2", "e1/p2"]
        assert history == {"r0": [3] * 4, "r1": [5] * 4, "r2": [30] * 4}  # both epochs
    else:
        assert epoch1[:2] == ["e1/p0", "e1/p0"]
        assert sorted(history) == [f"e{e}/p{i}" for e in range(2) for i in range(3)]


@pytest.mark.parametrize("submit_order", ["fifo", "longest_predicted"])
def test_checkpoint_keeps_history_and_goes_on_exactly(submit_order):
    cfg = SchedulerConfig(
        policy="sorted",
        cache="keep",
        group_size=2,
        rollout_batch=4,
        update_batch=2,
        max_staleness=1,
        max_new_tokens=40,
        submit_order=submit_order,
        update_pacing=True,
    )

    def specs():
        return [PromptSpec(f"p{i}", 3, epoch=e) for e in range(3) for i in range(6)]

    def length(p, i, a, e):
        return 1 + (int(p[1:]) * 7 + i * 3 + a * 5 + e * 2) % 23

    full_trainer = UnitTrainer()
    full = run(Controller(cfg, specs()), SteppingEngine(3, length, True), full_trainer)
    ctl = Controller(cfg, specs())
    first = UnitTrainer()
    run(ctl, SteppingEngine(3, length, True), first, max_updates=7)
    state = json.loads(json.dumps(ctl.state_dict()))
    assert state["lengths"]["history"]["by_prompt"]  # the history is in the checkpoint
    restored = Controller(cfg, specs())
    restored.load_state_dict(state)
    engine = SteppingEngine(3, length, True)
    engine.load_weights(None, restored.version)
    second = UnitTrainer()
    resumed = run(restored, engine, second)
    ids = [[g.prompt_id for g in b.groups] for b in first.batches + second.batches]
    assert ids == [[g.prompt_id for g in b.groups] for b in full_trainer.batches]
    for key in ("tokens_generated", "tokens_wasted", "prompts_trained", "max_staleness_trained"):
        assert resumed.summary[key] == full.summary[key], key


def test_pacing_is_for_sorted_only():
    for policy in ("sync", "partial", "async"):
        with pytest.raises(ValueError, match=f"update_pacing is set, but policy {policy}"):
            SchedulerConfig(policy=policy, update_pacing=True)
    # sorted reads it with either cache (drop: every open group is at risk at each update).
    SchedulerConfig(policy="sorted", cache="drop", update_pacing=True)
