"""Invariants of the controller over random lengths, batch sizes and policies."""

from __future__ import annotations

import random
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from sortedrl.scheduling.config import SchedulerConfig
from sortedrl.scheduling.controller import Controller
from sortedrl.scheduling.loop import run
from sortedrl.scheduling.state import PromptSpec
from tests.stepping_engine import SteppingEngine, UnitTrainer


class CountingEngine(SteppingEngine):
    """Sums the tokens the engine itself says it generated."""

    generated = 0

    def step(self):
        report = super().step()
        self.generated += report.tokens_generated
        return report


def _lengths(seed: int, cap: int, sigma: float, prompt_sigma: float = 0.0):
    """Lognormal lengths; each prompt has its own median (prompt_sigma), so its history over
    epochs and its siblings predict its lengths without fixing them."""
    rng = random.Random(seed)
    cache: dict = {}
    medians: dict = {}

    def length(p: str, i: int, a: int, e: int = 0) -> int:
        key = (p, i, a, e)
        if key not in cache:
            if p not in medians:
                medians[p] = 3.0 + prompt_sigma * rng.gauss(0.0, 1.0)
            cache[key] = max(1, min(cap, int(rng.lognormvariate(medians[p], sigma))))
        return cache[key]

    return length


configs = st.fixed_dictionaries(
    {
        "policy": st.sampled_from(["sync", "sorted", "partial", "async"]),
        "cache": st.sampled_from(["drop", "keep"]),
        "admission": st.sampled_from(["round", "fill"]),
        "group_size": st.integers(1, 4),
        "update_batch": st.integers(1, 5),
        "extra_rollout": st.integers(0, 12),
        "max_staleness": st.integers(0, 3),
        "max_regenerations": st.integers(0, 3),
        "filter_equal_rewards": st.booleans(),
        "prompts": st.integers(0, 30),
        "capacity": st.integers(1, 24),
        "seed": st.integers(0, 10_000),
        "sigma": st.floats(0.1, 1.5),
        "cap": st.integers(1, 200),
        "pause": st.booleans(),
        "epochs": st.integers(1, 3),
        "prompt_sigma": st.floats(0.0, 1.5),
        "submit_order": st.sampled_from(["fifo", "longest_predicted"]),
        "update_pacing": st.booleans(),
        # As `sortedrl train`: a prompt id per admission, the history keyed on the record.
        "record_ids": st.booleans(),
    }
)


def _run(c: dict, max_updates: int | None = None):
    cfg = SchedulerConfig.for_policy(
        c["policy"],
        cache=c["cache"],
        admission=c["admission"],
        group_size=c["group_size"],
        update_batch=c["update_batch"],
        rollout_batch=c["update_batch"] + c["extra_rollout"],
        max_staleness=c["max_staleness"],
        max_regenerations=c["max_regenerations"],
        filter_equal_rewards=c["filter_equal_rewards"],
        max_new_tokens=c["cap"],
        submit_order=c["submit_order"],
        update_pacing=c["update_pacing"] and c["policy"] == "sorted",
    )
    if c["record_ids"]:
        specs = [
            PromptSpec(f"p{i}@{e}", 5, epoch=e, record_id=f"p{i}")
            for e in range(c["epochs"])
            for i in range(c["prompts"])
        ]
    else:
        specs = [
            PromptSpec(f"p{i}", 5, epoch=e) for e in range(c["epochs"]) for i in range(c["prompts"])
        ]
    ctl = Controller(cfg, specs)
    of_record = _lengths(c["seed"], c["cap"], c["sigma"], c["prompt_sigma"])

    def lengths(p, i, a, e):
        return of_record(p.split("@")[0], i, a, e)  # a record's lengths, whatever its id

    engine = CountingEngine(c["capacity"], lengths, by_epoch=True)
    trainer = UnitTrainer(3.0)
    rng = random.Random(c["seed"])

    def scorer(gens, keys):
        return [float(rng.random() < 0.5) for _ in gens], 0.0

    result = run(
        ctl, engine, trainer, scorer=scorer, max_updates=max_updates, pause_for_update=c["pause"]
    )
    return cfg, result, engine, trainer


@settings(max_examples=150, deadline=None)
@given(configs)
def test_counts_balance_and_limits_hold(c):
    cfg, result, engine, trainer = _run(c)
    s = result.summary
    # Every admitted prompt ends trained or dropped with a reason (the run went to the end).
    assert s["prompts_in_flight"] == 0
    assert s["prompts_admitted"] == c["prompts"] * c["epochs"]
    assert s["prompts_admitted"] == s["prompts_trained"] + s["prompts_dropped"]
    if not cfg.filter_equal_rewards:
        assert s["prompts_dropped"] == 0  # nothing starves, nothing is lost
    # Tokens: what the engine generated is exactly trained + wasted.
    assert s["tokens_generated"] == engine.generated
    assert s["tokens_generated"] == s["tokens_trained"] + s["tokens_wasted"] + s["tokens_in_flight"]
    assert s["tokens_in_flight"] == 0
    assert result.controller.num_queued == 0  # the queue count never drifts
    # No prompt trained twice in an epoch (nor lost); every trained group is complete.
    ids = [g.prompt_id for b in trainer.batches for g in b.groups]
    assert not c["record_ids"] or len(set(ids)) == len(ids)  # each admission once
    trained = Counter(pid.split("@")[0] for pid in ids)
    assert sum(trained.values()) == s["prompts_trained"]
    assert all(n <= c["epochs"] for n in trained.values())
    if not cfg.filter_equal_rewards:
        assert trained == {f"p{i}": c["epochs"] for i in range(c["prompts"])}
    for b in trainer.batches:
        assert 1 <= len(b.groups) <= cfg.update_batch
        for g in b.groups:
            assert len(g.samples) == cfg.group_size
            assert all(smp.finish_reason in ("stop", "length") for smp in g.samples)
            assert all(sum(n for _, n in smp.version_spans) == smp.n_tokens for smp in g.samples)
    # Only the last update may be short of update_batch (end of data), unless groups were
    # filtered, in which case sync tops up and the others train what completes.
    if not cfg.filter_equal_rewards:
        assert all(len(b.groups) == cfg.update_batch for b in trainer.batches[:-1])
    # Staleness stays within the policy's limit.
    limit = cfg.staleness_limit
    if limit is not None:
        assert s["max_staleness_trained"] <= limit
    if cfg.policy == "sync":  # nothing is ever stale in sync; only filtered groups are wasted
        assert set(s["tokens_wasted_by_reason"]) <= {"equal_rewards"}
    assert 0.0 <= s["bubble_ratio"] <= 1.0


@settings(max_examples=40, deadline=None)
@given(configs, st.integers(1, 3))
def test_counts_balance_when_stopped_early(c, max_updates):
    _, result, engine, _ = _run(c, max_updates=max_updates)
    s = result.summary
    assert (
        s["prompts_admitted"]
        == s["prompts_trained"] + s["prompts_dropped"] + s["prompts_in_flight"]
    )
    assert s["tokens_generated"] == engine.generated
    assert s["tokens_generated"] == s["tokens_trained"] + s["tokens_wasted"] + s["tokens_in_flight"]


@settings(max_examples=30, deadline=None)
@given(configs)
def test_same_seed_same_result(c):
    a = _run(c)[1].summary
    b = _run(c)[1].summary
    assert a == b
