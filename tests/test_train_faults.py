"""Faults inside a real (tiny) training run: a crashing engine, non-finite updates, SIGTERM."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from sortedrl.config import load_config  # noqa: E402

pytestmark = pytest.mark.usefixtures("cache")


@pytest.fixture
def tiny(tiny_run):
    """The tiny run, checkpointed every 2 updates."""
    return [*tiny_run, "checkpoint.every_updates=2"]


def test_a_crashing_engine_is_restarted_and_the_run_completes(tiny, tmp_path, monkeypatch):
    from sortedrl.commands.train import train
    from sortedrl.engines.transformers_engine import TransformersEngine

    real_step = TransformersEngine.step
    calls = {"n": 0}

    def flaky_step(self):
        calls["n"] += 1
        if calls["n"] in (5, 40):
            raise RuntimeError("simulated worker crash")
        return real_step(self)

    closed = []
    monkeypatch.setattr(TransformersEngine, "step", flaky_step)
    monkeypatch.setattr(
        TransformersEngine, "close", lambda self: closed.append(self), raising=False
    )
    s = train(load_config(None, tiny), tmp_path / "run", progress=False)
    assert s["engine_restarts"] >= 1  # (eval runs on the engine class too: not every call is RL)
    # Each failed engine is closed before it is replaced; so are the two evaluations' engines
    # (before and after: the tiny run has no periodic or sampled evaluation).
    assert len(closed) == s["engine_restarts"] + 2
    assert s["prompts_trained"] == 16 and s["prompts_in_flight"] == 0
    assert s["tokens_generated"] == s["tokens_trained"] + s["tokens_wasted"]


def test_an_engine_that_keeps_crashing_stops_with_a_checkpoint(tiny, tmp_path, monkeypatch):
    import sortedrl.commands.train as train_module
    from sortedrl.commands.train import train
    from sortedrl.engines.transformers_engine import TransformersEngine
    from sortedrl.errors import SortedRLError

    real_step, real_eval = TransformersEngine.step, train_module.evaluate_run
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

    monkeypatch.setattr(train_module, "evaluate_run", eval_then_break)
    monkeypatch.setattr(TransformersEngine, "step", dead)
    # max_engine_failures=3: restarted after the 1st and 2nd failure, stopped at the 3rd.
    with pytest.raises(
        SortedRLError, match=r"failed 3 time\(s\) in a row.*checkpoint written to .*resume"
    ):
        train(load_config(None, [*tiny, "max_engine_failures=3"]), tmp_path / "run", progress=False)
    assert list((tmp_path / "run" / "checkpoints").glob("step-*"))


def test_non_finite_updates_stop_the_run_and_keep_the_last_checkpoint(tiny, tmp_path, monkeypatch):
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
        train(load_config(None, tiny), tmp_path / "run", progress=False)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["skipped"] for x in lines] == [False] * 4 + [True] * 3
    from sortedrl.commands.checkpoint import latest_checkpoint

    found, warnings = latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert found is not None and found.step == 6 and not warnings


def test_untrusted_rewards_are_sandboxed_by_default(tmp_path):
    from sortedrl.tasks.registry import build_task
    from sortedrl.tasks.scoring import make_scorer

    data = tmp_path / "m.jsonl"
    data.write_text('{"problem": "1+1?", "answer": "2"}\n')
    for name in ("math", "dataset"):  # math-verify meets model output: sandboxed
        cfg = load_config(None, [f"task.name={name}", f"task.path={data}"])
        scorer = make_scorer(cfg.task, build_task(cfg.task))
        try:
            assert scorer.n_workers == 2, name
        finally:
            scorer.close()
    cfg = load_config(None, [])  # the built-in reverse verifier: in-process, size limit only
    scorer = make_scorer(cfg.task, build_task(cfg.task))
    assert scorer.n_workers == 0
    scorer.close()


def test_resume_with_other_settings_is_refused_by_name(tiny, tmp_path):
    from sortedrl.commands.train import train
    from sortedrl.errors import ConfigError

    out = tmp_path / "run"
    train(load_config(None, [*tiny, "max_updates=2"]), out, progress=False)
    with pytest.raises(ConfigError, match="settings differ.*trainer.lr"):
        train(load_config(None, [*tiny, "trainer.lr=0.5", "resume=auto"]), out, progress=False)
    # The same settings (a longer budget is not a setting of the run) go on.
    s = train(load_config(None, [*tiny, "resume=auto"]), out, progress=False)
    assert s["prompts_trained"] == 16 and s["resumed_from"]


def test_async_engine_restart_never_copies_weights_the_trainer_is_changing(
    tiny, tmp_path, monkeypatch
):
    """Under `async` the trainer changes the model in its own thread. An engine that fails in
    the middle of an update is restarted with the weights of the last finished update, not a
    copy of the half-updated model."""
    import threading

    import torch

    from sortedrl.commands.run import Run
    from sortedrl.commands.train import train
    from sortedrl.engines.transformers_engine import TransformersEngine
    from sortedrl.training.trainer import GRPOTrainer

    real_update, real_step, real_restart = (
        GRPOTrainer.update,
        TransformersEngine.step,
        Run.restart_engine,
    )
    in_update, restarted = threading.Event(), threading.Event()
    seen: list[float] = []

    def update_with_a_slow_middle(self, batch):
        if not restarted.is_set():
            with torch.no_grad():  # the middle of a step: weights far from any version
                for p in self.model.parameters():
                    p.add_(1000.0)
            in_update.set()
            restarted.wait(timeout=60)
            with torch.no_grad():
                for p in self.model.parameters():
                    p.sub_(1000.0)
            in_update.clear()
        return real_update(self, batch)

    def step_failing_mid_update(self):
        if in_update.is_set() and not restarted.is_set():
            raise RuntimeError("worker lost")
        return real_step(self)

    def restart_and_look(self):
        engine = real_restart(self)
        seen.append(max(float(p.detach().abs().max()) for p in engine.model.parameters()))
        restarted.set()
        return engine

    monkeypatch.setattr(GRPOTrainer, "update", update_with_a_slow_middle)
    monkeypatch.setattr(TransformersEngine, "step", step_failing_mid_update)
    monkeypatch.setattr(Run, "restart_engine", restart_and_look)
    s = train(
        load_config(None, [*tiny, "scheduler.policy=async"]), tmp_path / "run", progress=False
    )
    assert len(seen) == 1 and seen[0] < 100.0, seen  # no +1000 of the half-done step
    assert s["engine_restarts"] == 1 and s["prompts_trained"] == 16
