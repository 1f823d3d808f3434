"""The window-fit rule (`rollout_batch: auto`): its model, its choices, its settings, and the
controller's invariants and checkpoints while it adapts."""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from sortedrl.scheduling.config import FIXED_ROLLOUT_BATCH, SchedulerConfig
from sortedrl.scheduling.controller import Controller
from sortedrl.scheduling.loop import run
from sortedrl.scheduling.rollout_batch import (
    WindowFitRule,
    best_rollout_batch,
    candidates,
    predict,
)
from sortedrl.scheduling.state import PromptSpec
from tests.stepping_engine import SteppingEngine, UnitTrainer

# --- the model ------------------------------------------------------------------------------


def test_equal_lengths_follow_littles_law():
    # G = 1, every response L long: E[M] = E[S] = L, so T = U L / (R - U/2) and the engine runs
    # R - U/2 responses; nothing outruns a window of (K + 1/2) T >= T.
    groups = [[100]] * 50
    p = predict(groups, 12, update_batch=8, capacity=1000, staleness_limit=1)
    assert p.interval == pytest.approx(8 * 100 / (12 - 4))
    assert p.running == pytest.approx(8)
    assert p.wait == 0.0
    # Past the capacity, T is bound by it: U E[S] / C.
    p = predict(groups, 200, update_batch=8, capacity=10, staleness_limit=1)
    assert p.running == 10
    assert p.interval == pytest.approx(8 * 100 / 10)


def test_the_wait_is_the_longest_overrun_of_an_update():
    # 99 groups of 10 and one of 1000, U = 100: the quantile 1 - 1/U is the long one.
    groups = [[10]] * 99 + [[1000]]
    p = predict(groups, 150, update_batch=100, capacity=10**6, staleness_limit=0)
    window = 0.5 * p.interval
    assert p.wait == pytest.approx(1000 - window)


def test_equal_lengths_fill_the_engine_and_a_tail_holds_r_back():
    u, cap = 8, 64
    flat = [[50] * 4] * 40
    r_flat = best_rollout_batch(flat, update_batch=u, capacity=cap, staleness_limit=2)
    # No group outruns its window, so fewer steps per update all the way to the R that fills
    # the engine: the last candidate.
    last = candidates(flat, update_batch=u, capacity=cap, staleness_limit=2)
    assert r_flat == last[-1].rollout_batch and last[-1].running >= cap
    rng = random.Random(0)
    tail = [[int(rng.lognormvariate(3.5, 1.2)) + 1 for _ in range(4)] for _ in range(40)]
    kw = {"update_batch": u, "capacity": cap, "staleness_limit": 2}
    r_tail = best_rollout_batch(tail, **kw)
    # The long groups would hold updates back: the rule stops short of filling the engine.
    assert u <= r_tail < candidates(tail, **kw)[-1].rollout_batch


@settings(deadline=None)
@given(
    groups=st.lists(
        st.lists(st.integers(1, 5000), min_size=1, max_size=8), min_size=1, max_size=60
    ),
    u=st.integers(1, 64),
    cap=st.integers(1, 2000),
    k=st.integers(0, 3),
)
def test_the_choice_is_a_candidate_at_least_u(groups, u, cap, k):
    kw = {"update_batch": u, "capacity": cap, "staleness_limit": k}
    ps = candidates(groups, **kw)
    r = best_rollout_batch(groups, **kw)
    assert r >= u and r in {p.rollout_batch for p in ps}
    best = min(p.steps_per_update for p in ps)
    assert next(p for p in ps if p.rollout_batch == r).steps_per_update == best


# --- the unbiased prefix --------------------------------------------------------------------


def test_only_the_completed_prefix_of_admission_order_is_used():
    rule = WindowFitRule(update_batch=2, group_size=2, staleness_limit=1)
    rule.set_capacity(16)
    assert rule.rollout_batch == max(2, round(2 / 2 + 16 / 2))  # R0 = U/2 + C/G
    r0 = rule.rollout_batch
    # Groups 1 and 2 (short) complete before group 0 (long): they wait for it.
    rule.group_completed(1, [3, 4])
    rule.group_completed(2, [5, 2])
    rule.admitted_through(0)
    assert rule.decide() == r0  # nothing in the prefix yet
    rule.group_completed(0, [90, 80])
    rule.admitted_through(3)
    state = rule.state_dict()
    assert state["prefix"] == [[90, 80], [3, 4], [5, 2]] and state["pending"] == []
    rule.decide()
    copy = WindowFitRule(update_batch=2, group_size=2, staleness_limit=1)
    copy.load_state_dict(json.loads(json.dumps(state)))
    assert copy.state_dict() == state and copy.decide() == rule.decide()


# --- settings -------------------------------------------------------------------------------


def test_auto_is_sorted_default_and_a_number_is_honoured():
    assert SchedulerConfig().rollout_batch == "auto"
    assert SchedulerConfig().adaptive_rollout_batch
    assert not SchedulerConfig(rollout_batch=32).adaptive_rollout_batch
    # partial and async keep the fixed value of before when it is unset ...
    assert SchedulerConfig(policy="partial").effective_rollout_batch == FIXED_ROLLOUT_BATCH
    assert SchedulerConfig(policy="async").effective_rollout_batch == FIXED_ROLLOUT_BATCH
    # ... and refuse auto set explicitly, naming it.
    with pytest.raises(ValidationError, match="rollout_batch=auto is sorted's"):
        SchedulerConfig(policy="partial", rollout_batch="auto")
    with pytest.raises(ValidationError):
        SchedulerConfig(rollout_batch="many")
    # A fixed R stays fixed through a run.
    cfg = SchedulerConfig(group_size=1, rollout_batch=5, update_batch=2, max_new_tokens=30)
    ctl = Controller(cfg, [PromptSpec(f"p{i}", 3) for i in range(20)])
    run(ctl, SteppingEngine(4, _lengths(1, 30)), UnitTrainer())
    assert ctl.rollout_batch == 5


def test_auto_adapts_on_a_run():
    cfg = SchedulerConfig(group_size=2, update_batch=2, max_new_tokens=200)
    ctl = Controller(cfg, [PromptSpec(f"p{i}", 3) for i in range(80)])
    seen = []
    run(
        ctl,
        SteppingEngine(16, _lengths(4, 200, sigma=1.2)),
        UnitTrainer(),
        on_update=lambda *a: seen.append(ctl.rollout_batch),
    )
    assert seen[0] == 1 + 16 // 2  # R0 = U/2 + C/G
    assert len(set(seen)) > 1  # it moved once the prefix held U groups
    assert all(r >= cfg.update_batch for r in seen)


# --- invariants under the rule --------------------------------------------------------------


def _lengths(seed: int, cap: int, sigma: float = 0.9):
    rng = random.Random(seed)
    medians: dict = {}
    table: dict = {}

    def length(p, i, a, e=0):
        key = (p, i, a, e)
        if key not in table:
            if p not in medians:
                medians[p] = 2.5 + 0.8 * rng.gauss(0.0, 1.0)
            table[key] = max(1, min(cap, int(rng.lognormvariate(medians[p], sigma))))
        return table[key]

    return length


cases = st.fixed_dictionaries(
    {
        "group_size": st.integers(1, 4),
        "update_batch": st.integers(1, 5),
        "max_staleness": st.integers(0, 3),
        "max_regenerations": st.integers(0, 3),
        "cache": st.sampled_from(["keep", "drop"]),
        "update_pacing": st.booleans(),
        "prompts": st.integers(1, 40),
        "epochs": st.integers(1, 2),
        "capacity": st.integers(1, 24),
        "cap": st.integers(1, 150),
        "sigma": st.floats(0.1, 1.5),
        "seed": st.integers(0, 10_000),
        "pause": st.booleans(),
    }
)


def _config(c: dict) -> SchedulerConfig:
    over = {} if c["cache"] == "drop" else {"max_staleness": c["max_staleness"]}
    return SchedulerConfig(
        policy="sorted",
        cache=c["cache"],
        group_size=c["group_size"],
        update_batch=c["update_batch"],
        max_regenerations=c["max_regenerations"],
        update_pacing=c["update_pacing"],
        max_new_tokens=c["cap"],
        **over,
    )


def _specs(c: dict) -> list[PromptSpec]:
    return [
        PromptSpec(f"p{i}", 3, epoch=e) for e in range(c["epochs"]) for i in range(c["prompts"])
    ]


@settings(max_examples=80, deadline=None)
@given(cases)
def test_invariants_hold_while_the_rule_adapts(c):
    cfg = _config(c)
    assert cfg.adaptive_rollout_batch
    trainer = UnitTrainer()
    ctl = Controller(cfg, _specs(c))
    engine = SteppingEngine(c["capacity"], _lengths(c["seed"], c["cap"], c["sigma"]), by_epoch=True)
    result = run(ctl, engine, trainer, pause_for_update=c["pause"])
    s = result.summary
    n = c["prompts"] * c["epochs"]
    # Counts balance; nothing starves (every prompt trained), nothing is trained twice.
    assert s["prompts_admitted"] == s["prompts_trained"] == n
    assert s["prompts_in_flight"] == 0 and s["prompts_dropped"] == 0
    assert s["tokens_generated"] == s["tokens_trained"] + s["tokens_wasted"]
    trained = [(g.prompt_id, b.version) for b in trainer.batches for g in b.groups]
    per_prompt: dict[str, int] = {}
    for pid, _ in trained:
        per_prompt[pid] = per_prompt.get(pid, 0) + 1
    assert per_prompt == {f"p{i}": c["epochs"] for i in range(c["prompts"])}
    # Staleness within the bound; every update but the last is a full one.
    assert s["max_staleness_trained"] <= cfg.staleness_limit
    assert all(len(b.groups) == cfg.update_batch for b in trainer.batches[:-1])
    assert ctl.rollout_batch >= cfg.update_batch


def _trained(trainer):
    return [
        (
            b.version,
            [
                (g.prompt_id, [tuple(map(tuple, x.version_spans)) for x in g.samples])
                for g in b.groups
            ],
        )
        for b in trainer.batches
    ]


@settings(max_examples=40, deadline=None)
@given(cases, st.integers(1, 8))
def test_a_resume_in_the_middle_of_an_adaptation_goes_on_identically(c, stop_at):
    cfg = _config(c)
    lengths = _lengths(c["seed"], c["cap"], c["sigma"])
    full_trainer = UnitTrainer()
    full_r: list[int] = []
    full_ctl = Controller(cfg, _specs(c))
    full = run(
        full_ctl,
        SteppingEngine(c["capacity"], lengths, by_epoch=True),
        full_trainer,
        on_update=lambda *a: full_r.append(full_ctl.rollout_batch),
    )

    first_trainer = UnitTrainer()
    ctl = Controller(cfg, _specs(c))
    first_r: list[int] = []
    run(
        ctl,
        SteppingEngine(c["capacity"], lengths, by_epoch=True),
        first_trainer,
        max_updates=stop_at,
        on_update=lambda *a: first_r.append(ctl.rollout_batch),
    )
    assume(not ctl.done())
    state = json.loads(json.dumps(ctl.state_dict()))
    restored = Controller(cfg, _specs(c))
    restored.load_state_dict(state)
    assert restored.rollout_batch == ctl.rollout_batch
    engine = SteppingEngine(c["capacity"], lengths, by_epoch=True)
    engine.load_weights(None, restored.version)
    second_trainer = UnitTrainer()
    second_r: list[int] = []
    resumed = run(
        restored,
        engine,
        second_trainer,
        on_update=lambda *a: second_r.append(restored.rollout_batch),
    )
    assert _trained(first_trainer) + _trained(second_trainer) == _trained(full_trainer)
    assert first_r + second_r == full_r  # the same rollout batches, update by update
    for k in ("prompts_trained", "tokens_generated", "tokens_trained", "tokens_wasted", "updates"):
        assert resumed.summary[k] == full.summary[k], k
