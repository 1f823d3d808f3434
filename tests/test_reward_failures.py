"""Your reward functions fail loudly and by name: each failure is counted by kind for the
function that failed, the others still count, and the task's verifier alone says what is
correct."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest

from sortedrl.tasks.base import Problem, Score
from sortedrl.tasks.dataset import DatasetTask
from sortedrl.tasks.reward_report import FAILURE_KINDS, RewardReport
from sortedrl.tasks.rewards import RewardRunner
from sortedrl.tasks.user_rewards import load_reward_fns

REWARDS = """
import time

import numpy as np

def works(completions, **kwargs):
    return [1.0 for _ in completions]

def raises(completions, **kwargs):
    raise ValueError("my reward is broken")

def a_string(completions, **kwargs):
    return ["1.0" for _ in completions]

def a_nan(completions, **kwargs):
    return [float("nan") for _ in completions]

def one_too_many(completions, **kwargs):
    return [0.5 for _ in completions] + [0.5]

def not_a_list(completions, **kwargs):
    return 0.5

def numpy_array(completions, **kwargs):
    return np.array([0.25 for _ in completions])

def numpy_scalars(completions, **kwargs):
    return [np.float32(0.5) for _ in completions]

def by_ids(completions, completion_ids, **kwargs):
    return [float(len(ids)) for ids in completion_ids]

def conversational(completions, **kwargs):
    return [1.0 if c[0]["content"] else 0.0 for c in completions]

def own_none(problem, response):
    pass

def own_numpy(problem, response):
    return np.float64(2.0)

def sleeps(completions, **kwargs):
    time.sleep(60)
    return [1.0 for _ in completions]
"""


@pytest.fixture()
def rewards_module(tmp_path, monkeypatch):
    (tmp_path / "h_rewards.py").write_text(REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # the sandbox's workers import it too
    sys.modules.pop("h_rewards", None)
    yield
    sys.modules.pop("h_rewards", None)


P = Problem("p0", "12+7=", "19", meta={"columns": {}})


def _score(specs, response="19", token_ids=(1, 2, 3), judge=None, workers=0, timeout_s=10.0):
    runner = RewardRunner(
        load_reward_fns(specs, None, judge=judge), workers=workers, timeout_s=timeout_s
    )
    try:
        return runner.score_batch([(P, response, list(token_ids))])[0], runner
    finally:
        runner.close()


def _failure(score, name):
    (part,) = [p for p in score.parts if p[0] == name]
    return part[2]


@pytest.mark.parametrize(
    ("fn", "kind", "words"),
    [
        ("raises", "raised", "ValueError: my reward is broken"),
        ("a_string", "wrong_type", "str"),
        ("a_nan", "non_finite", "nan"),
        ("one_too_many", "wrong_length", "2 values for 1 completion"),
        ("not_a_list", "wrong_type", "float"),
        ("own_none", "wrong_type", "None"),
        ("conversational", "raised", "TypeError"),
    ],
)
def test_a_failing_function_is_named_and_does_not_zero_the_others(rewards_module, fn, kind, words):
    s, _ = _score([f"h_rewards:{fn}", "h_rewards:works"])
    # The working function's reward stands; the failing one's share is 0 and reported.
    assert s.reward == 1.0
    failure = _failure(s, fn)
    assert failure is not None and failure.startswith(f"{kind}:"), failure
    assert words in failure
    assert _failure(s, "works") is None


def test_numpy_values_and_completion_ids_are_accepted_as_trl_accepts_them(rewards_module):
    specs = ["h_rewards:numpy_array", "h_rewards:numpy_scalars", "h_rewards:own_numpy"]
    s, _ = _score([*specs, "h_rewards:by_ids"], token_ids=[5, 6, 7, 8])
    assert [p[2] for p in s.parts] == [None] * 4
    assert s.reward == pytest.approx(0.25 + 0.5 + 2.0 + 4.0)


def test_accuracy_is_the_verifiers_verdict_even_when_a_function_fails(rewards_module):
    judge = DatasetTask(path="unused")
    s, _ = _score(["h_rewards:raises"], "19", judge=judge)
    assert s.correct and s.reward == 0.0
    s, _ = _score(["h_rewards:works"], "18", judge=judge)
    assert not s.correct and s.reward == 1.0


def test_a_hanging_function_is_timed_out_alone_and_counted(rewards_module):
    s, runner = _score(["h_rewards:sleeps", "h_rewards:works"], workers=1, timeout_s=1.0)
    assert _failure(s, "sleeps").startswith("timed_out:")
    assert s.reward == 1.0 and runner.errors["timeout"] == 1


def test_the_report_counts_failures_by_kind_and_means_per_function():
    ok = Score(1.0, True, True, parts=(("a", 1.0, None), ("b", 0.5, None)))
    bad = Score(0.5, False, True, parts=(("a", None, "raised: KeyError: 'x'"), ("b", 0.5, None)))
    skipped = Score(0.0, False, True, parts=(("a", None, None), ("b", None, None)))
    report = RewardReport(["a", "b"])
    for s in (ok, bad, bad, skipped):
        report.add(s)
    m = report.metrics()
    assert m["rewards/a/mean"] == 1.0 and m["rewards/b/mean"] == 0.5
    assert m["reward_failures/a/raised"] == 2 and m["reward_failures/a/failed"] == 2
    assert all(m[f"reward_failures/b/{k}"] == 0 for k in FAILURE_KINDS)
    assert report.calls == {"a": 4, "b": 4}
    assert report.messages["a"] == ["raised: KeyError: 'x'"] * 2
    assert report.failed_every_call() == []
    only_bad = RewardReport(["a", "b"])
    only_bad.add(bad)
    assert only_bad.failed_every_call() == ["a"]
    assert math.isnan(RewardReport(["c"]).metrics()["rewards/c/mean"])
    assert np.isfinite(m["rewards/a/mean"])


# --- in a run: the console, metrics.jsonl, TensorBoard, summary.json; the stop ----------------

ROWS = [{"sum": f"{a}+{b}", "expected": a + b} for a in range(6) for b in range(6)]


def _run_args(tmp_path, *rewards):
    import json

    from sortedrl.models.tiny import build_char_tokenizer, build_tiny_model, save_tiny

    tokenizer = build_char_tokenizer("0123456789+= Qwhatis?")
    save_tiny(build_tiny_model(len(tokenizer), seed=0, size="micro"), tokenizer, tmp_path / "m")
    data = tmp_path / "sums.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return [
        f"model.path={tmp_path / 'm'}",
        "task.name=dataset",
        f"task.path={data}",
        "task.prompt_key=sum",
        "task.answer_key=expected",
        "task.prompt_template=Q what is {problem}?=",
        f"task.reward_fns=[{', '.join(rewards)}]",
        "task.train_prompts=48",
        "task.eval_prompts=4",
        "task.reward_workers=0",
        "scheduler.group_size=2",
        "rollout.capacity=8",
        "scheduler.max_new_tokens=4",
        "scheduler.update_batch=4",
        "scheduler.rollout_batch=8",
        "eval.sampled=0",
    ]


def test_a_raising_reward_is_on_the_console_in_the_metrics_and_in_the_summary(
    rewards_module, tmp_path, capsys
):
    import json

    from sortedrl.commands.train import train
    from sortedrl.config import load_config

    args = _run_args(tmp_path, "h_rewards:raises", "h_rewards:works")
    out = tmp_path / "run"
    summary = train(load_config(None, [*args, "max_updates=2"]), out, progress=False)
    printed = capsys.readouterr().out
    assert "reward function 'raises' failed" in printed
    assert "raised: ValueError: my reward is broken" in printed
    assert printed.count("my reward is broken") == 3  # the first three, then one line
    assert "further failures are counted" in printed
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for line in lines:
        assert line["reward_failures/raises/raised"] == line["samples"] == 8
        assert line["reward_failures/works/failed"] == 0
        assert line["rewards/works/mean"] == 1.0 and math.isnan(line["rewards/raises/mean"])
        assert line["reward_mean"] == 1.0  # the working function's share stands
    assert summary["reward_failures"] == {"raises": {"raised": 16}}
    assert summary["eval_before"]["reward_failures"] == {"raises": {"raised": 4}}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(out / "tb"))
    tb.Reload()
    assert "reward_failures/raises/raised" in tb.Tags()["scalars"]
    assert "rewards/works/mean" in tb.Tags()["scalars"]


def test_a_function_failing_every_call_stops_the_run_with_a_checkpoint(rewards_module, tmp_path):
    from sortedrl.commands.checkpoint import complete_checkpoints
    from sortedrl.commands.train import RewardFunctionError, train
    from sortedrl.config import load_config

    args = _run_args(tmp_path, "h_rewards:a_string", "h_rewards:works")
    out = tmp_path / "run"
    cfg = load_config(None, [*args, "max_updates=6", "task.reward_fail_updates=2"])
    with pytest.raises(RewardFunctionError) as e:
        train(cfg, out, progress=False)
    msg = str(e.value)
    assert "'a_string' failed on every call for 2 updates in a row" in msg
    assert "wrong_type: returned str" in msg and "--resume auto" in msg
    assert [p.name for p in complete_checkpoints(out / "checkpoints")][-1] == "step-00000002"
    # 0: count, never stop.
    cfg = load_config(None, [*args, "max_updates=3", "task.reward_fail_updates=0"])
    assert train(cfg, tmp_path / "run0", progress=False)["updates"] == 3


def test_eval_command_prints_each_failing_function(rewards_module, tmp_path):
    from click.testing import CliRunner

    from sortedrl.cli import main

    _run_args(tmp_path, "h_rewards:works")
    args = ["eval", "--model", str(tmp_path / "m"), "--task", "dataset"]
    args += ["--path", str(tmp_path / "sums.jsonl"), "--prompt-key", "sum"]
    args += ["--answer-key", "expected", "--prompts", "4", "--max-new-tokens", "4"]
    args += ["--reward-fns", "h_rewards:not_a_list", "--reward-fns", "h_rewards:works"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "reward function 'not_a_list' failed (evaluation" in res.output
    assert "reward function 'not_a_list' failed on 4 calls (wrong_type 4)" in res.output
    assert "mean reward 1.000" in res.output


def test_a_resumed_run_counts_the_failures_of_responses_scored_before_its_checkpoint(
    rewards_module, tmp_path
):
    """Responses scored before a checkpoint and trained after it keep their parts: the resumed
    run's metrics are the uninterrupted run's."""
    import json

    from sortedrl.commands.train import train
    from sortedrl.config import load_config

    args = _run_args(tmp_path, "h_rewards:raises", "h_rewards:works", "h_rewards:by_ids")
    args += ["checkpoint.every_updates=1", "scheduler.policy=sorted", "task.reward_fail_updates=0"]
    args += ["scheduler.update_batch=2", "scheduler.max_new_tokens=6"]
    train(load_config(None, [*args, "max_updates=5"]), tmp_path / "ref", progress=False)
    out = tmp_path / "resumed"
    train(load_config(None, [*args, "max_updates=3"]), out, progress=False)
    train(load_config(None, [*args, "max_updates=5", "resume=auto"]), out, progress=False)

    clock = ("time", "elapsed", "bubble")  # wall-clock measurements differ from run to run

    def lines(run):
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        timeless = [{k: v for k, v in r.items() if not any(t in k for t in clock)} for r in rows]
        return [{k: (None if v != v else v) for k, v in r.items()} for r in timeless]  # NaN

    assert lines(out) == lines(tmp_path / "ref")
    assert all(r["reward_failures/raises/raised"] == r["samples"] for r in lines(out))
