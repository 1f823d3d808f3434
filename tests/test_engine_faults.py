"""An engine that dies mid-rollout is restarted and the run goes on; one that keeps dying
stops the run cleanly with the controller ready for a checkpoint."""

from __future__ import annotations

import random

import pytest

from sortedrl.scheduling.config import SchedulerConfig
from sortedrl.scheduling.controller import Controller
from sortedrl.scheduling.loop import EngineFailedError, run
from sortedrl.scheduling.state import PromptSpec
from tests.stepping_engine import SteppingEngine, UnitTrainer


def _lengths(p, i, a):
    return 3 + (int(p[1:]) * 7 + i * 3) % 17


class Flaky(SteppingEngine):
    """Raises on the steps it is told to, like a crashed worker."""

    def __init__(self, capacity, length, fail_at):
        super().__init__(capacity, length)
        self.fail_at, self.steps = fail_at, 0

    def step(self):
        self.steps += 1
        if self.steps in self.fail_at:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return super().step()


@pytest.mark.parametrize("policy", ["sync", "sorted", "partial", "async"])
def test_engine_failures_are_survived_and_counts_balance(policy):
    cfg = SchedulerConfig.for_policy(
        policy,
        group_size=2,
        rollout_batch=6,
        update_batch=2,
        max_staleness=2,
        max_new_tokens=40,
    )
    rng = random.Random(0)
    engines = []

    def restart():
        e = Flaky(5, _lengths, fail_at={rng.randint(1, 30)})
        engines.append(e)
        return e

    first = Flaky(5, _lengths, fail_at={3, 9})
    res = run(
        Controller(cfg, [PromptSpec(f"p{i}", 3) for i in range(20)]),
        first,
        UnitTrainer(),
        restart_engine=restart,
        max_engine_failures=3,
    )
    s = res.summary
    assert res.engine_restarts >= 1
    assert s["prompts_trained"] == 20 and s["prompts_in_flight"] == 0
    assert s["tokens_generated"] == s["tokens_trained"] + s["tokens_wasted"]


def test_an_engine_that_keeps_failing_stops_the_run_cleanly():
    cfg = SchedulerConfig(
        policy="sorted", group_size=2, rollout_batch=6, update_batch=2, max_new_tokens=40
    )
    ctl = Controller(cfg, [PromptSpec(f"p{i}", 3) for i in range(20)])

    def restart():
        return Flaky(5, _lengths, fail_at={1})

    with pytest.raises(EngineFailedError, match="failed 3 time"):
        run(
            ctl,
            Flaky(5, _lengths, fail_at={4}),
            UnitTrainer(),
            restart_engine=restart,
            max_engine_failures=3,
        )
    # Nothing is lost: the controller holds every response and can be checkpointed.
    state = ctl.state_dict()
    assert (
        state["ledger"]["prompts_admitted"]
        == len(state["groups"]) + state["ledger"]["prompts_trained"]
    )


def test_should_stop_leaves_a_consistent_controller():
    cfg = SchedulerConfig(
        policy="sorted", group_size=2, rollout_batch=6, update_batch=2, max_new_tokens=40
    )
    ctl = Controller(cfg, [PromptSpec(f"p{i}", 3) for i in range(20)])
    calls = iter(range(1000))
    res = run(ctl, SteppingEngine(5, _lengths), UnitTrainer(), should_stop=lambda: next(calls) > 12)
    assert res.stopped
    s = res.summary
    assert (
        s["prompts_admitted"]
        == s["prompts_trained"] + s["prompts_dropped"] + s["prompts_in_flight"]
    )
    assert s["tokens_generated"] == s["tokens_trained"] + s["tokens_wasted"] + s["tokens_in_flight"]
    ctl.state_dict()  # nothing running: a checkpoint can be taken
