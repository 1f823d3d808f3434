"""The train command as a careful user meets it: reruns into the same folder, resuming (time
over segments, another model), one temperature, sandboxed evaluation."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from sortedrl.config import load_config  # noqa: E402
from sortedrl.errors import ConfigError  # noqa: E402

pytestmark = pytest.mark.usefixtures("cache")


@pytest.fixture
def tiny(tiny_run):
    """The tiny run, checkpointed every 2 updates, evaluated only before and after."""
    return [*tiny_run, "checkpoint.every_updates=2", "eval.every_updates=0"]


def test_a_rerun_into_the_same_out_is_refused_and_overwrite_starts_afresh(tiny, tmp_path):
    from sortedrl.commands.train import train

    out = tmp_path / "run"
    train(load_config(None, [*tiny, "max_updates=4"]), out, progress=False)
    first = sorted(p.name for p in (out / "checkpoints").iterdir())
    with pytest.raises(ConfigError, match=r"previous run .*--resume auto.*--overwrite"):
        train(load_config(None, [*tiny, "max_updates=2"]), out, progress=False)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == first  # untouched

    train(load_config(None, [*tiny, "max_updates=2"]), out, progress=False, overwrite=True)
    # Only this run's checkpoint, and it survived its own pruning.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002"]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    with pytest.raises(ConfigError, match="exclude each other"):
        train(load_config(None, [*tiny, "resume=auto"]), out, progress=False, overwrite=True)


def test_resume_refuses_another_model_by_name_and_adds_time_across_segments(tiny, tmp_path):
    from sortedrl.commands.train import train

    out = tmp_path / "run"
    first = train(load_config(None, [*tiny, "max_updates=6"]), out, progress=False)
    # Another model: refused by the setting's name before its weights are loaded.
    with pytest.raises(ConfigError, match=r"settings differ.*model\.tiny_size"):
        train(load_config(None, [*tiny, "model.tiny_size=micro", "resume=auto"]), out)
    whole = train(load_config(None, [*tiny, "resume=auto"]), out, progress=False)
    assert whole["updates"] == 8 and whole["resumed_from"]
    # The second segment ran 2 of the 8 updates; the summary covers all of them.
    assert whole["loop_time_s"] > first["loop_time_s"]
    assert whole["generating_time_s"] > first["generating_time_s"]
    assert whole["rollout_time_s"] > first["rollout_time_s"]
    assert whole["update_time_s"] > first["update_time_s"]
    split = sum(
        whole[k] for k in ("rollout_time_s", "reward_time_s", "update_time_s", "weight_sync_time_s")
    )
    assert split + whole["idle_time_s"] == pytest.approx(whole["loop_time_s"], rel=1e-9)
    assert whole["goodput_tokens_per_s"] == pytest.approx(
        whole["tokens_trained"] / whole["loop_time_s"], rel=1e-9
    )
    assert whole["wall_time_s"] > first["wall_time_s"]


def test_fresh_tokens_have_weight_one_at_any_rollout_temperature(tiny, tmp_path):
    """The trainer recomputes log-probs at the engine's temperature: in a `sync` update every
    token is fresh, so the importance weight and the ratio are exactly 1."""
    from sortedrl.commands.train import train

    out = tmp_path / "run"
    tiny = [a for a in tiny if not a.startswith("scheduler.rollout_batch")]  # sync has none
    args = [*tiny, "rollout.temperature=0.7", "scheduler.policy=sync", "max_updates=2"]
    train(load_config(None, args), out, progress=False)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for line in lines:
        assert line["max_staleness_trained"] == 0
        assert abs(line["train/is_weight_mean"] - 1.0) < 1e-4, line
        assert abs(line["train/ratio_mean"] - 1.0) < 1e-4, line


def test_evaluation_scores_through_the_runs_sandbox_and_reward_fn(tiny, tmp_path):
    from sortedrl.commands.evaluate import evaluate_run
    from sortedrl.commands.prepare import prepare_model, problems_of
    from sortedrl.tasks.registry import build_task
    from sortedrl.tasks.scoring import make_scorer

    base = [*tiny, "task.eval_prompts=2", "scheduler.max_new_tokens=4"]
    cfg = load_config(None, [*base, "task.reward_fns=[reward_fns:always_one]"])
    task = build_task(cfg.task)
    _, held_out = problems_of(cfg, task)
    model, tok = prepare_model(cfg, task)
    scorer = make_scorer(cfg.task, task)
    try:
        assert evaluate_run(cfg, model, tok, scorer, held_out)["reward_mean"] == 1.0
    finally:
        scorer.close()
    # A reward that never returns is cut off by the hard time limit in a worker process.
    hang = ["task.reward_fns=[reward_fns:never_returns]", "task.reward_timeout_s=1"]
    cfg = load_config(None, [*base, *hang, "task.reward_workers=1"])
    scorer = make_scorer(cfg.task, task)
    try:
        result = evaluate_run(cfg, model, tok, scorer, held_out)
    finally:
        scorer.close()
    assert result["reward_mean"] == 0.0 and scorer.errors["timeout"] == 2
    assert not math.isnan(result["accuracy"])
