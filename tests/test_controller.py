"""Scripted scenarios: the controller does what docs/design.md says (the algorithm as built)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from sortedrl.scheduling.config import SchedulerConfig
from sortedrl.scheduling.controller import Controller
from sortedrl.scheduling.loop import run
from sortedrl.scheduling.metrics import OvercountedBusyTime, bubble_ratio
from sortedrl.scheduling.protocol import StepReport
from sortedrl.scheduling.state import PromptSpec
from tests.stepping_engine import SteppingEngine, UnitTrainer


def _prompts(n: int) -> list[PromptSpec]:
    return [PromptSpec(f"p{i}", 4) for i in range(n)]


def _by_prompt(table: dict[str, int]):
    """All responses of prompt p have length table[p] (attempts alike)."""
    return lambda p, i, a: table[p]


def test_sorted_trains_short_groups_first_within_a_round():
    lengths = {f"p{i}": L for i, L in enumerate([50, 10, 40, 20, 30, 60, 5, 15])}
    cfg = SchedulerConfig(
        policy="sorted",
        group_size=2,
        rollout_batch=8,
        update_batch=2,
        cache="keep",
        max_staleness=8,
        max_new_tokens=100,
    )
    trainer = UnitTrainer()
    run(Controller(cfg, _prompts(8)), SteppingEngine(16, _by_prompt(lengths)), trainer)
    order = [[g.prompt_id for g in b.groups] for b in trainer.batches]
    assert order == [["p6", "p1"], ["p7", "p3"], ["p4", "p2"], ["p0", "p5"]]


def test_bubble_is_reported_per_round():
    # Two sync rounds of 2 prompts x 2 responses on 16 slots: each round's rollout runs as
    # long as its longest response while its shorter group leaves 2 slots busy, then 2.
    lengths = {f"p{i}": L for i, L in enumerate([50, 10, 40, 20])}
    cfg = SchedulerConfig(policy="sync", group_size=2, update_batch=2, max_new_tokens=100)
    res = run(Controller(cfg, _prompts(4)), SteppingEngine(16, _by_prompt(lengths)), UnitTrainer())
    # round 0: busy 4*10 + 2*40 = 120 slot-steps of 16*50; round 1: 4*20 + 2*20 = 120 of 16*40
    assert res.summary["round_bubble_ratio"] == [
        pytest.approx(1 - 120 / 800, abs=1e-4),
        pytest.approx(1 - 120 / 640, abs=1e-4),
    ]


def test_sync_waits_for_the_whole_batch():
    lengths = {f"p{i}": L for i, L in enumerate([50, 10, 40, 20])}
    cfg = SchedulerConfig(policy="sync", group_size=2, update_batch=2, max_new_tokens=100)
    trainer = UnitTrainer()
    res = run(Controller(cfg, _prompts(4)), SteppingEngine(16, _by_prompt(lengths)), trainer)
    assert [[g.prompt_id for g in b.groups] for b in trainer.batches] == [
        ["p1", "p0"],
        ["p3", "p2"],
    ]
    # Batch 1 runs 50 steps with 4 slots busy for 10 steps, 2 for 40; capacity 16.
    assert res.summary["rollout_time_s"] == 50 + 40
    assert res.summary["tokens_wasted"] == 0


def test_drop_trains_only_fresh_tokens_and_counts_the_waste():
    lengths = {"p0": 5, "p1": 30, "p2": 6, "p3": 40}
    cfg = SchedulerConfig(
        policy="sorted",
        cache="drop",
        group_size=1,
        rollout_batch=4,
        update_batch=1,
        max_new_tokens=100,
    )
    res = run(Controller(cfg, _prompts(4)), SteppingEngine(8, _by_prompt(lengths)), UnitTrainer())
    s = res.summary
    assert s["max_staleness_trained"] == 0
    assert s["tokens_wasted"] > 0 and s["tokens_wasted_by_reason"].get("stale_partial", 0) > 0
    assert s["prompts_trained"] == 4
    assert s["tokens_generated"] == s["tokens_trained"] + s["tokens_wasted"]


def test_keep_resumes_partials_across_updates_within_the_bound():
    lengths = {"p0": 5, "p1": 12, "p2": 20}
    cfg = SchedulerConfig(
        policy="sorted",
        cache="keep",
        max_staleness=2,
        group_size=1,
        rollout_batch=3,
        update_batch=1,
        max_new_tokens=100,
    )
    trainer = UnitTrainer()
    res = run(Controller(cfg, _prompts(3)), SteppingEngine(8, _by_prompt(lengths)), trainer)
    assert res.summary["tokens_wasted"] == 0
    last = trainer.batches[-1].groups[0].samples[0]
    # p2 was generated across three versions: 5 tokens at v0, 7 at v1, 8 at v2.
    assert last.version_spans == [(0, 5), (1, 7), (2, 8)]
    assert res.summary["max_staleness_trained"] == 2


def test_keep_discards_work_past_max_staleness_and_regenerates_it():
    lengths = {"p0": 5, "p1": 6, "p2": 7, "p3": 100}
    cfg = SchedulerConfig(
        policy="sorted",
        cache="keep",
        max_staleness=1,
        group_size=1,
        rollout_batch=4,
        update_batch=1,
        max_regenerations=5,
        max_new_tokens=100,
    )
    res = run(Controller(cfg, _prompts(4)), SteppingEngine(8, _by_prompt(lengths)), UnitTrainer())
    s = res.summary
    assert s["max_staleness_trained"] <= 1
    assert s["regenerations"] >= 1
    assert s["prompts_trained"] == 4


def test_a_long_prompt_cannot_starve():
    # p3 is always long; with drop it is discarded at every update until it is protected,
    # then updates wait for it and it is trained on-policy.
    lengths = {"p0": 3, "p1": 4, "p2": 5, "p3": 60, "p4": 3, "p5": 4, "p6": 5, "p7": 6}
    cfg = SchedulerConfig(
        policy="sorted",
        cache="drop",
        group_size=1,
        rollout_batch=8,
        update_batch=1,
        max_regenerations=1,
        max_new_tokens=100,
    )
    trainer = UnitTrainer()

    class Attempts(SteppingEngine):
        p3_attempts = 0

        def submit(self, requests):
            for r in requests:
                if r.prompt_id == "p3":
                    self.p3_attempts = max(self.p3_attempts, r.attempt)
            super().submit(requests)

    engine = Attempts(8, _by_prompt(lengths))
    res = run(Controller(cfg, _prompts(8)), engine, trainer)
    trained = [g.prompt_id for b in trainer.batches for g in b.groups]
    assert sorted(trained) == sorted(lengths)
    assert res.summary["max_staleness_trained"] == 0
    # Discarded past max_regenerations, then protected (update_batch groups at a time,
    # first come first served) until trained.
    assert 1 <= engine.p3_attempts < 8


def test_equal_reward_groups_are_dropped_and_replaced():
    lengths = {f"p{i}": 3 + i for i in range(6)}
    cfg = SchedulerConfig(
        policy="sync", group_size=2, update_batch=2, filter_equal_rewards=True, max_new_tokens=100
    )
    trainer = UnitTrainer()

    def scorer(gens, keys):  # p0 and p1 get equal rewards, the rest differ by sample
        return [1.0 if p in ("p0", "p1") else float(i) for p, i in keys], 0.0

    ctl = Controller(cfg, _prompts(6))
    res = run(ctl, SteppingEngine(16, _by_prompt(lengths)), trainer, scorer=scorer)
    s = res.summary
    assert s["prompts_dropped_by_reason"] == {"equal_rewards": 2}
    assert s["prompts_trained"] == 4
    assert [len(b.groups) for b in trainer.batches] == [2, 2]


def test_async_never_pauses_and_overlaps_training():
    lengths = {f"p{i}": 10 for i in range(8)}
    cfg = SchedulerConfig(
        policy="async",
        group_size=1,
        rollout_batch=4,
        update_batch=2,
        max_staleness=2,
        max_new_tokens=100,
    )

    class NoPause(SteppingEngine):
        def pause(self):
            raise AssertionError("async must not pause the engine")

    res = run(Controller(cfg, _prompts(8)), NoPause(4, _by_prompt(lengths)), UnitTrainer(5.0))
    s = res.summary
    assert s["prompts_trained"] == 8
    assert s["max_staleness_trained"] <= 2
    # Four updates of 5 s each ran beside the engine: the wall time is less than the sum.
    assert s["update_time_s"] == 4 * 5.0
    assert s["wall_time_s"] < s["rollout_time_s"] + s["update_time_s"]


def test_config_errors_name_the_field():
    with pytest.raises(ValidationError, match="update_batch"):
        SchedulerConfig(policy="sorted", rollout_batch=4, update_batch=8)
    with pytest.raises(ValidationError, match="group_size"):
        SchedulerConfig(group_size=0)
    with pytest.raises(ValidationError, match="policy"):
        SchedulerConfig(policy="fastest")


def test_unknown_request_from_engine_is_an_error():
    from sortedrl.scheduling.protocol import Generation

    ctl = Controller(SchedulerConfig(policy="sync", update_batch=1, group_size=1), _prompts(1))
    with pytest.raises(RuntimeError, match="unknown"):
        ctl.on_generations([Generation("nope", "stop", 1, [(0, 1)])])


@pytest.mark.parametrize(
    "policy, setting, value",
    [
        ("sync", "cache", "drop"),
        ("sync", "max_staleness", 2),
        ("sync", "rollout_batch", 64),
        ("sync", "admission", "fill"),
        ("partial", "max_staleness", 3),
        ("partial", "cache", "keep"),
        ("async", "admission", "round"),
    ],
)
def test_a_setting_the_policy_ignores_is_an_error_naming_it(policy, setting, value):
    with pytest.raises(ValidationError, match=f"{setting} is set, but policy {policy} ignores"):
        SchedulerConfig(policy=policy, **{setting: value})


def test_sorted_with_drop_refuses_max_staleness_but_keep_uses_it():
    with pytest.raises(ValidationError, match="max_staleness is set, but policy sorted with"):
        SchedulerConfig(policy="sorted", cache="drop", max_staleness=1)
    assert SchedulerConfig(policy="sorted", cache="keep", max_staleness=1).staleness_limit == 1


def test_defaults_are_never_refused_and_for_policy_leaves_out_the_ignored():
    for policy in ("sync", "sorted", "partial", "async"):
        SchedulerConfig(policy=policy)  # nothing explicit: nothing refused
    shared = {"cache": "drop", "max_staleness": 1, "rollout_batch": 8, "update_batch": 4}
    cfg = SchedulerConfig.for_policy("sync", **shared)
    assert cfg.model_fields_set == {"policy", "update_batch"}
    assert SchedulerConfig.for_policy("async", **shared).max_staleness == 1


def test_update_due_takes_no_trainer_flag():
    # The run loop waits for a busy trainer itself; the controller answers for its own state.
    ctl = Controller(SchedulerConfig(policy="sync", update_batch=1, group_size=1), _prompts(1))
    assert ctl.update_due() is False
    with pytest.raises(TypeError):
        ctl.update_due(True)  # type: ignore[call-arg]


def test_overcounted_busy_time_is_an_error_not_a_zero_bubble():

    assert bubble_ratio(5.0, 2, 5.0) == 0.5
    assert bubble_ratio(10.0, 2, 5.0) == 0.0  # exactly full
    with pytest.raises(OvercountedBusyTime, match="exceeds capacity 2"):
        bubble_ratio(11.0, 2, 5.0)  # 1.1 sequences per slot: impossible


def test_an_engine_that_overcounts_busy_time_fails_the_run():
    class Overcounting(SteppingEngine):
        def step(self):
            report = super().step()
            report.busy_slot_s = 2 * self.capacity * report.elapsed_s
            return report

    cfg = SchedulerConfig(policy="sync", group_size=1, update_batch=2, max_new_tokens=100)
    with pytest.raises(OvercountedBusyTime):
        run(Controller(cfg, _prompts(4)), Overcounting(2, lambda p, i, a: 3), UnitTrainer())


def test_a_group_with_older_tokens_goes_ahead_of_newer_ones_that_completed_first():
    # p2 (10 tokens) starts under version 0 beside p0 and p1 (1 token each), which make the
    # first update. p3 (8 tokens) and p4 (9) start under version 1: p3 completes one step
    # before p2, p4 with it. Three groups are then complete; the version of the oldest token
    # decides first, so p2 (the closest to the staleness limit) goes ahead of p3.
    lengths = {"p0": 1, "p1": 1, "p2": 10, "p3": 8, "p4": 9, "p5": 1}
    cfg = SchedulerConfig(
        policy="sorted", group_size=1, rollout_batch=3, update_batch=2, max_new_tokens=100
    )
    trainer = UnitTrainer()
    run(Controller(cfg, _prompts(6)), SteppingEngine(3, _by_prompt(lengths)), trainer)
    order = [[g.prompt_id for g in b.groups] for b in trainer.batches]
    assert order[:2] == [["p0", "p1"], ["p2", "p3"]]


class Settling(SteppingEngine):
    """Holds back what finishes on odd-numbered prompts while other work runs, as the Ray
    replica pool does with a slow replica's step still in flight; `settle` reports it."""

    steps_in_flight = True

    def __init__(self, capacity, length, calls):
        super().__init__(capacity, length)
        self.calls, self.held, self.prompt_of = calls, [], {}
        self.settled_ids: list[str] = []

    def submit(self, requests):
        self.prompt_of.update({r.request_id: r.prompt_id for r in requests})
        super().submit(requests)

    def num_unfinished(self):
        return super().num_unfinished() + len(self.held)

    def step(self):
        self.calls.append("step")
        if super().num_unfinished() == 0:  # only held work left: it comes back now
            return self._release()
        report = super().step()
        odd = [g for g in report.finished if int(self.prompt_of[g.request_id][1:]) % 2]
        self.held += odd
        report.finished = [g for g in report.finished if g not in odd]
        return report

    def settle(self):
        self.calls.append("settle")
        self.settled_ids += [g.request_id for g in self.held]
        return self._release()

    def _release(self):
        report, self.held = StepReport(self.held, 0.0, 0.0, 0, 0), []
        return report

    def pause(self):
        self.calls.append("pause")
        return super().pause()

    def load_weights(self, weights, version):
        self.calls.append("load_weights")
        return super().load_weights(weights, version)


@pytest.mark.parametrize("policy", ["sorted", "async"])
def test_the_loop_settles_an_engine_before_an_update_and_trains_what_it_reports(policy):
    lengths = {f"p{i}": [3, 2, 10, 12, 4, 3, 9, 7][i] for i in range(8)}
    cfg = SchedulerConfig.for_policy(
        policy, group_size=1, rollout_batch=4, update_batch=2, max_staleness=1, max_new_tokens=20
    )
    calls: list[str] = []
    engine = Settling(4, _by_prompt(lengths), calls)
    scored: dict[str, float] = {}

    def scorer(gens, keys):
        rewards = [float(k[0][1:]) for k in keys]  # reward = the prompt's number
        scored.update({g.request_id: r for g, r in zip(gens, rewards, strict=True)})
        return rewards, 0.0

    trainer = UnitTrainer()
    res = run(Controller(cfg, _prompts(8)), engine, trainer, scorer=scorer)
    assert res.summary["prompts_trained"] == 8
    # Before every weight load (after every update) the engine was settled since its last step.
    engine_calls = [c for c in calls if c in ("step", "settle", "load_weights")]
    for i, c in enumerate(engine_calls):
        if c == "load_weights":
            assert "settle" in engine_calls[:i] and engine_calls[i - 1] != "step"
    # What the settles reported was scored and trained like any step's generations.
    assert engine.settled_ids and all(rid in scored for rid in engine.settled_ids)
    trained = {s.reward for b in trainer.batches for g in b.groups for s in g.samples}
    assert {scored[rid] for rid in engine.settled_ids} <= trained


@pytest.mark.parametrize("admission", ["fill", "round"])
def test_requests_handed_out_ahead_follow_the_ones_for_free_slots(admission):
    cfg = SchedulerConfig(
        policy="sorted", group_size=2, rollout_batch=4, update_batch=2, admission=admission
    )
    plain, ahead = Controller(cfg, _prompts(8)), Controller(cfg, _prompts(8))
    first = plain.requests_to_submit(2)
    more = ahead.requests_to_submit(2, ahead=4)
    # The same first requests, then the next ones in the queue's order.
    assert [r.request_id for r in more[:2]] == [r.request_id for r in first]
    assert [(r.prompt_id, r.sample_index) for r in more] == [
        ("p0", 0), ("p0", 1), ("p1", 0), ("p1", 1), ("p2", 0), ("p2", 1)
    ]  # fmt: skip
    # fill admits for the room ahead as for free slots; round admits its whole batch anyway.
    admitted = 3 if admission == "fill" else 4
    assert ahead.ledger.prompts_admitted == admitted
    # Never past the rollout batch (4 prompts) however much room is ahead.
    assert len(ahead.requests_to_submit(0, ahead=20)) == 2
    assert ahead.ledger.prompts_admitted == 4


@pytest.mark.parametrize("policy", ["sorted", "partial"])
def test_an_engine_that_takes_requests_ahead_trains_every_prompt_once(policy):
    """An engine that queues `submit_ahead` requests beyond its slots (as the replica pool's
    backlogs): every prompt is trained or dropped once and the token counts balance."""
    lengths = {f"p{i}": 5 + (7 * i) % 23 for i in range(12)}
    cfg = SchedulerConfig(
        policy=policy, group_size=2, rollout_batch=4, update_batch=2, max_new_tokens=40
    )
    engine = SteppingEngine(4, _by_prompt(lengths))
    engine.submit_ahead = 3
    peak = [0]
    submit = engine.submit

    def watch(requests):
        submit(requests)
        peak[0] = max(peak[0], engine.num_unfinished())

    engine.submit = watch
    trainer = UnitTrainer()
    s = run(Controller(cfg, _prompts(12)), engine, trainer).summary
    assert 4 < peak[0] <= 4 + 3  # it did hold requests beyond its slots, never more than 3
    assert s["prompts_trained"] + s["prompts_dropped"] == 12 and s["prompts_in_flight"] == 0
    assert s["tokens_generated"] == s["tokens_trained"] + s["tokens_wasted"]
    trained = [g.prompt_id for b in trainer.batches for g in b.groups]
    assert len(trained) == len(set(trained))
