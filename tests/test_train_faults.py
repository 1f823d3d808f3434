"""Faults inside a real (tiny) training run: a crashing engine, non-finite updates, SIGTERM."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from sortedrl.config import load_config  # noqa: E402

TINY = [
    "task.train_prompts=16",
    "task.eval_prompts=4",
    "model.warm_start_steps=3",
    "model.warm_start_batch=8",
    "rollout.group_size=2",
    "rollout.capacity=8",
    "scheduler.update_batch=2",
    "scheduler.rollout_batch=4",
    "rollout.max_new_tokens=16",
    "checkpoint.every_updates=2",
    "eval.sampled=0",
]


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SORTEDRL_CACHE", str(tmp_path / "cache"))


def test_a_crashing_engine_is_restarted_and_the_run_completes(tmp_path, monkeypatch):
    from sortedrl.commands.train import train
    from sortedrl.engines.transformers_engine import TransformersEngine

    real_step = TransformersEngine.step
    calls = {"n": 0}

    def flaky_step(self):
        calls["n"] += 1
        if calls["n"] in (5, 40):
            raise RuntimeError("simulated worker crash")
        return real_step(self)

    monkeypatch.setattr(TransformersEngine, "step", flaky_step)
    s = train(load_config(None, TINY), tmp_path / "run", progress=False)
    assert s["engine_restarts"] >= 1  # (eval runs on the engine class too: not every call is RL)
    assert s["prompts_trained"] == 16 and s["prompts_in_flight"] == 0
    assert s["tokens_generated"] == s["tokens_trained"] + s["tokens_wasted"]


def test_an_engine_that_keeps_crashing_stops_with_a_checkpoint(tmp_path, monkeypatch):
    import sortedrl.commands.train as train_module
    from sortedrl.commands.train import train
    from sortedrl.engines.transformers_engine import TransformersEngine
    from sortedrl.errors import SortedRLError

    real_step, real_eval = TransformersEngine.step, train_module._eval
    state = {"evaluated": False, "steps": 0}

    def eval_then_break(*args, **kwargs):
        result = real_eval(*args, **kwargs)
        state["evaluated"] = True
        return result

    def dead(self):
        state["steps"] += state["evaluated"]
        if state["steps"] > 8:  # some rollout, then the device is lost for good
            raise RuntimeError("device lost")
        return real_step(self)

    monkeypatch.setattr(train_module, "_eval", eval_then_break)
    monkeypatch.setattr(TransformersEngine, "step", dead)
    with pytest.raises(SortedRLError, match="failed 2 time.*checkpoint written to .*resume"):
        train(load_config(None, [*TINY, "max_engine_restarts=1"]), tmp_path / "run", progress=False)
    assert list((tmp_path / "run" / "checkpoints").glob("step-*"))


def test_non_finite_updates_stop_the_run_and_keep_the_last_checkpoint(tmp_path, monkeypatch):
    from sortedrl.commands.train import NumericalError, train
    from sortedrl.training.trainer import GRPOTrainer

    real_update = GRPOTrainer.update
    calls = {"n": 0}

    def nan_after_four(self, batch):
        calls["n"] += 1
        result = real_update(self, batch)
        if calls["n"] > 4:
            result.skipped = True  # as a NaN loss would: no optimizer step
        return result

    monkeypatch.setattr(GRPOTrainer, "update", nan_after_four)
    with pytest.raises(NumericalError, match="3 updates in a row.*step-00000006.*intact"):
        train(load_config(None, TINY), tmp_path / "run", progress=False)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["skipped"] for x in lines] == [False] * 4 + [True] * 3
    from sortedrl.commands.checkpoint import latest_checkpoint

    found, warnings = latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert found is not None and found["step"] == 6 and not warnings


def test_untrusted_rewards_are_sandboxed_by_default(tmp_path):
    from sortedrl.commands.train import _make_score_fn, build_task
    from sortedrl.tasks.rewards import RewardRunner

    data = tmp_path / "m.jsonl"
    data.write_text('{"problem": "1+1?", "answer": "2"}\n')
    cfg = load_config(None, ["task.name=math", f"task.path={data}"])
    scorer, close = _make_score_fn(cfg, build_task(cfg))
    try:
        assert isinstance(scorer, RewardRunner) and scorer.n_workers == 2
    finally:
        close()
    cfg = load_config(None, [])  # the built-in reverse verifier: in-process
    scorer, close = _make_score_fn(cfg, build_task(cfg))
    assert scorer.n_workers == 0
    close()


def test_resume_with_other_settings_is_refused_by_name(tmp_path):
    from sortedrl.commands.train import train
    from sortedrl.errors import ConfigError

    out = tmp_path / "run"
    train(load_config(None, [*TINY, "max_updates=2"]), out, progress=False)
    with pytest.raises(ConfigError, match="settings differ.*trainer.lr"):
        train(load_config(None, [*TINY, "trainer.lr=0.5", "resume=auto"]), out, progress=False)
    # The same settings (a longer budget is not a setting of the run) go on.
    s = train(load_config(None, [*TINY, "resume=auto"]), out, progress=False)
    assert s["prompts_trained"] == 16 and s["resumed_from"]
