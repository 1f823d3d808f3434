"""A controller checkpointed between updates and restored goes on exactly as if never stopped."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from sortedrl.scheduling.checkpoint_format import CHECKPOINT_FORMAT
from sortedrl.scheduling.config import SchedulerConfig
from sortedrl.scheduling.controller import Controller
from sortedrl.scheduling.loop import run
from sortedrl.scheduling.state import PromptSpec
from tests.stepping_engine import SteppingEngine, UnitTrainer


def _restored(config, prompts, state):
    """A controller built from `config` and `prompts` that goes on from `state`."""
    ctl = Controller(config, prompts)
    ctl.load_state_dict(state)
    return ctl


def _lengths(seed: int):
    rng = random.Random(seed)
    table: dict = {}

    def length(p, i, a):
        key = (p, i, a)
        if key not in table:
            table[key] = max(1, min(60, int(rng.lognormvariate(2.5, 0.9))))
        return table[key]

    return length


def _prompts(n):
    return [PromptSpec(f"p{i}", 3, [1, 2, i]) for i in range(n)]


def _trained(trainer):
    return [
        (
            b.version,
            [
                (g.prompt_id, [tuple(map(tuple, s.version_spans)) for s in g.samples])
                for g in b.groups
            ],
        )
        for b in trainer.batches
    ]


LEDGER_KEYS = [
    "prompts_admitted",
    "prompts_trained",
    "prompts_dropped",
    "tokens_generated",
    "tokens_trained",
    "tokens_wasted",
    "tokens_wasted_by_reason",
    "regenerations",
    "max_staleness_trained",
    "staleness_histogram",
    "updates",
    "update_response_len_mean",
    "samples_trained",
]


@settings(max_examples=40, deadline=None)
@given(
    policy=st.sampled_from(["sync", "sorted", "partial"]),
    cache=st.sampled_from(["drop", "keep"]),
    stop_at=st.integers(1, 6),
    seed=st.integers(0, 1000),
    filt=st.booleans(),
)
def test_restore_goes_on_exactly(policy, cache, stop_at, seed, filt):
    cfg = SchedulerConfig.for_policy(
        policy,
        cache=cache,
        group_size=2,
        rollout_batch=6,
        update_batch=2,
        max_staleness=1,
        max_regenerations=1,
        filter_equal_rewards=filt,
        max_new_tokens=60,
    )
    rewards = random.Random(seed)
    reward_table: dict = {}

    def scorer(gens, keys):
        out = []
        for key, g in zip(keys, gens, strict=True):
            k = (key, g.n_tokens)
            reward_table.setdefault(k, float(rewards.random() < 0.5))
            out.append(reward_table[k])
        return out, 0.0

    # Uninterrupted.
    full_trainer = UnitTrainer()
    full = run(
        Controller(cfg, _prompts(20)),
        SteppingEngine(5, _lengths(seed)),
        full_trainer,
        scorer=scorer,
    )

    # Stopped after `stop_at` updates, checkpointed through JSON, restored, finished.
    first_trainer = UnitTrainer()
    ctl = Controller(cfg, _prompts(20))
    lengths = _lengths(seed)
    run(ctl, SteppingEngine(5, lengths), first_trainer, scorer=scorer, max_updates=stop_at)
    assume(not ctl.done())  # nothing left to restore
    state = json.loads(json.dumps(ctl.state_dict()))
    restored = Controller(cfg, _prompts(20))
    restored.load_state_dict(state)
    engine = SteppingEngine(5, lengths)
    engine.load_weights(None, restored.version)
    second_trainer = UnitTrainer()
    resumed = run(restored, engine, second_trainer, scorer=scorer)

    assert _trained(first_trainer) + _trained(second_trainer) == _trained(full_trainer)
    for k in LEDGER_KEYS:
        assert resumed.summary[k] == full.summary[k], k


def test_restore_refuses_other_settings_or_short_data():
    cfg = SchedulerConfig(
        policy="sorted", group_size=1, rollout_batch=4, update_batch=2, max_new_tokens=60
    )
    ctl = Controller(cfg, _prompts(8))
    run(ctl, SteppingEngine(4, _lengths(0)), UnitTrainer(), max_updates=1)
    state = ctl.state_dict()
    with pytest.raises(ValueError, match="update_batch"):
        _restored(cfg.model_copy(update={"update_batch": 1}), _prompts(8), state)
    with pytest.raises(ValueError, match="shorter"):
        _restored(cfg, _prompts(2), state)


def test_a_checkpoint_written_before_state_dict_existed_still_loads():
    # Written by the module-level controller_state() of the code before Controller.state_dict
    # (format 1: the update records still had the old key names, max_staleness for the
    # measured value): sorted/keep stopped after 4 updates, 3 prompts open.
    old = json.loads((Path(__file__).parent / "data" / "controller_state_v1.json").read_text())
    cfg = SchedulerConfig(
        policy="sorted",
        cache="keep",
        group_size=2,
        rollout_batch=6,
        update_batch=2,
        max_staleness=1,
        max_regenerations=1,
        max_new_tokens=60,
        update_pacing=False,  # the run before update pacing existed
    )
    assert old["format"] == 1 and "max_staleness" in old["ledger"]["updates"][0]
    ctl = _restored(cfg, _prompts(20), old)
    new = json.loads(json.dumps(ctl.state_dict()))
    assert new["format"] == CHECKPOINT_FORMAT
    assert (
        new["ledger"]["updates"][0]["max_staleness_trained"]
        == (old["ledger"]["updates"][0]["max_staleness"])
    )
    _assert_same_state_but_length_fields(new, old)
    result = run(ctl, SteppingEngine(5, _lengths(3)), UnitTrainer())
    s = result.summary
    assert s["prompts_admitted"] == s["prompts_trained"] + s["prompts_dropped"] == 20
    assert s["tokens_generated"] == s["tokens_trained"] + s["tokens_wasted"]


def test_an_unknown_format_or_a_used_controller_is_refused():
    cfg = SchedulerConfig(group_size=1, rollout_batch=4, update_batch=2, max_new_tokens=60)
    ctl = Controller(cfg, _prompts(8))
    run(ctl, SteppingEngine(4, _lengths(0)), UnitTrainer(), max_updates=1)
    state = ctl.state_dict()
    with pytest.raises(ValueError, match="unknown controller checkpoint format 7"):
        Controller(cfg, _prompts(8)).load_state_dict({**state, "format": 7})
    with pytest.raises(RuntimeError, match="has not started"):
        ctl.load_state_dict(state)


def _assert_same_state_but_length_fields(new, old):
    """`new` (the current format) holds what `old` (format 1 or 2) did, plus the length-aware
    fields at the values of a run without them: epoch 0, no record id, queue rank 0, no
    history."""
    assert new["config"]["submit_order"] == "fifo" and new["config"]["update_pacing"] is False
    assert new["lengths"] is None
    assert [g.pop("epoch") for g in new["groups"]] == [0] * len(old["groups"])
    assert [g.pop("record_id") for g in new["groups"]] == [None] * len(old["groups"])
    assert [q.pop() for q in new["queue"]] == [0.0] * len(old["queue"])
    for key in ("groups", "queue", "complete", "cached", "version", "admitted"):
        assert new[key] == old[key], key


def test_a_format_2_checkpoint_loads_and_matches_a_fresh_run():
    # Written by Controller.state_dict of the code before the length-aware settings (format 2):
    # the setting of the format-1 test above, stopped after 4 updates.
    old = json.loads((Path(__file__).parent / "data" / "controller_state_v2.json").read_text())
    cfg = SchedulerConfig(
        policy="sorted",
        cache="keep",
        group_size=2,
        rollout_batch=6,
        update_batch=2,
        max_staleness=1,
        max_regenerations=1,
        max_new_tokens=60,
        update_pacing=False,  # the run before update pacing existed
    )
    assert old["format"] == 2 and "submit_order" not in old["config"]
    ctl = Controller(cfg, _prompts(20))
    ctl.load_state_dict(old)
    _assert_same_state_but_length_fields(json.loads(json.dumps(ctl.state_dict())), old)
    # Today's controller with the length-aware settings off decides as the old one did.
    fresh = Controller(cfg, _prompts(20))
    run(fresh, SteppingEngine(5, _lengths(3)), UnitTrainer(), max_updates=4)
    _assert_same_state_but_length_fields(json.loads(json.dumps(fresh.state_dict())), old)
    result = run(ctl, SteppingEngine(5, _lengths(3)), UnitTrainer())
    s = result.summary
    assert s["prompts_admitted"] == s["prompts_trained"] + s["prompts_dropped"] == 20
    assert s["tokens_generated"] == s["tokens_trained"] + s["tokens_wasted"]


def test_a_format_3_checkpoint_with_a_history_loads_and_matches_a_fresh_run():
    # Written by Controller.state_dict of the code before record ids (format 3): longest
    # predicted first and update pacing over two epochs of 10 prompts, stopped after 7 updates.
    old = json.loads((Path(__file__).parent / "data" / "controller_state_v3.json").read_text())
    cfg = SchedulerConfig(
        policy="sorted",
        cache="keep",
        group_size=2,
        rollout_batch=6,
        update_batch=2,
        max_staleness=1,
        max_regenerations=1,
        max_new_tokens=60,
        submit_order="longest_predicted",
        update_pacing=True,
    )

    def specs():
        return [PromptSpec(f"p{i}", 3, [1, 2, i], epoch=e) for e in range(2) for i in range(10)]

    assert old["format"] == 3 and old["lengths"]["history"]["by_prompt"]
    ctl = Controller(cfg, specs())
    ctl.load_state_dict(old)
    new = json.loads(json.dumps(ctl.state_dict()))
    assert [g.pop("record_id") for g in new["groups"]] == [None] * len(old["groups"])
    for key in ("groups", "queue", "lengths", "version", "admitted"):
        assert new[key] == old[key], key
    result = run(ctl, SteppingEngine(5, _lengths(3)), UnitTrainer())
    s = result.summary
    assert s["prompts_admitted"] == s["prompts_trained"] + s["prompts_dropped"] == 20
    assert s["tokens_generated"] == s["tokens_trained"] + s["tokens_wasted"]
    assert s["max_staleness_trained"] <= 1
    # Without record ids the prompt id stays the history's key, as it was.
    history = ctl.state_dict()["lengths"]["history"]["by_prompt"]
    assert (
        sorted(history)
        == sorted(old["lengths"]["history"]["by_prompt"])
        == sorted(f"p{i}" for i in range(10))
    )


def test_settings_a_policy_does_not_read_are_not_compared_on_resume():
    # update_pacing is on by default for sorted only (sync records it off, as before it
    # existed). A sync checkpoint that says otherwise still loads (sync never reads it); a
    # sorted run checkpointed when pacing was off by default is refused, naming both values.
    for policy, default in (("sync", False), ("sorted", True)):
        cfg = SchedulerConfig.for_policy(
            policy, group_size=1, update_batch=2, rollout_batch=4, max_new_tokens=60
        )
        ctl = Controller(cfg, _prompts(8))
        run(ctl, SteppingEngine(4, _lengths(0)), UnitTrainer(), max_updates=1)
        state = ctl.state_dict()
        assert state["config"]["update_pacing"] is default
        state["config"]["update_pacing"] = not default
        refused = policy == "sorted"
        fresh = Controller(cfg, _prompts(8))
        if refused:
            with pytest.raises(ValueError, match=r"update_pacing \(checkpoint False, now True\)"):
                fresh.load_state_dict(state)
        else:
            fresh.load_state_dict(state)
            assert fresh.version == 1
