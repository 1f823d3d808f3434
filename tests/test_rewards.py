import os
import pickle
import time

import pytest

from sortedrl.errors import ConfigError
from sortedrl.tasks.base import Problem, Score
from sortedrl.tasks.countdown import SyntheticTask, reference_solution
from sortedrl.tasks.rewards import RewardRunner, RewardWorkerError, error_kind
from sortedrl.tasks.user_rewards import load_reward_fn

TIMEOUT = 1.0
SLACK = 4.0  # scheduling noise on a loaded 2-core machine
P = Problem("p", "q", "5")


# Module-level scorers: worker processes import them by name.
def toy_scorer(problem, response):
    if response == "sleep":
        time.sleep(30)
    if response == "raise":
        raise ValueError("boom")
    if response == "exit":
        os._exit(3)
    if response == "nan":
        return float("nan")
    if response == "str":
        return "yes"
    if response == "score":
        return Score(0.5, False, True)
    return 1.0 if response == problem.answer else 0.0


def _explode():
    raise RuntimeError("cannot start")


class Unloadable:
    """Pickles fine, fails to unpickle in the worker."""

    def __reduce__(self):
        return (_explode, ())

    def __call__(self, problem, response):  # pragma: no cover
        return 0.0


@pytest.fixture(scope="module")
def runner():
    with RewardRunner(toy_scorer, timeout_s=TIMEOUT, workers=2, max_response_chars=1000) as r:
        r.score_batch([(P, "5")])  # wait until the workers are up
        yield r


def test_in_process_mode():
    r = RewardRunner(toy_scorer, workers=0, max_response_chars=10)
    out = r.score_batch(
        [
            (P, "5"),
            (P, "4"),
            (P, "raise"),
            (P, "x" * 11),
            (P, "nan"),
            (P, "str"),
            (P, "score"),
            (P, None),
        ]
    )
    assert [s.reward for s in out] == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.5, 0.0]
    assert out[0] == Score(1.0, True, True)
    assert out[2].error == "exception: ValueError: boom"
    assert out[3].error == "too_long"
    assert [error_kind(s.error) for s in out[4:6]] == ["bad_return", "bad_return"]
    assert out[6] == Score(0.5, False, True)
    assert error_kind(out[7].error) == "bad_input"
    assert r.errors == {"exception": 1, "too_long": 1, "bad_return": 2, "bad_input": 1}
    r.close()


def test_task_object_in_process():
    task = SyntheticTask()
    probs = task.problems("train", 20, seed=0)
    with RewardRunner(task, workers=0) as r:
        out = r.score_batch([(p, reference_solution(p)) for p in probs] + [(probs[0], "junk")])
    assert all(s.correct for s in out[:-1]) and out[-1].reward == 0.0


def test_timeout_does_not_hold_up_the_batch(runner):
    items = [(P, "5"), (P, "sleep"), (P, "4"), (P, "5"), (P, "raise"), (P, "5"), (P, "5")]
    before = runner.errors["timeout"]
    t0 = time.monotonic()
    out = runner.score_batch(items)
    elapsed = time.monotonic() - t0
    assert elapsed < TIMEOUT + SLACK
    assert out[1] == Score(0.0, False, False, error="timeout")
    assert [s.reward for s in out] == [1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0]
    assert error_kind(out[4].error) == "exception"
    assert runner.errors["timeout"] == before + 1
    # The killed worker was replaced: the next batch is scored normally.
    assert [s.reward for s in runner.score_batch([(P, "5")] * 4)] == [1.0] * 4
    assert len(runner._workers) == 2


def test_two_sleepers_run_in_parallel(runner):
    t0 = time.monotonic()
    out = runner.score_batch([(P, "sleep"), (P, "sleep"), (P, "5")])
    assert time.monotonic() - t0 < 2 * TIMEOUT + SLACK
    assert [s.error for s in out] == ["timeout", "timeout", None]


def test_per_call_durations(runner):
    before = runner.max_call_s
    out = runner.score_batch([(P, "5"), (P, "sleep"), (P, "x" * 1001)])
    assert [s.error for s in out] == [None, "timeout", "too_long"]
    d = runner.last_durations
    assert len(d) == 3
    assert 0.0 < d[0] < TIMEOUT
    assert TIMEOUT <= d[1] < TIMEOUT + SLACK  # a timed-out call counts until it was given up
    assert d[2] == 0.0  # answered by the size check, never sent to a worker
    assert runner.max_call_s == max(before, d[1])
    runner.score_batch([(P, "5")])
    assert len(runner.last_durations) == 1 and runner.max_call_s >= d[1]


def test_per_call_durations_in_process():
    r = RewardRunner(toy_scorer, workers=0, max_response_chars=10)
    assert r.last_durations == [] and r.max_call_s == 0.0
    r.score_batch([(P, "5"), (P, "x" * 11)])
    assert len(r.last_durations) == 2 and r.last_durations[1] == 0.0
    assert r.max_call_s == r.last_durations[0] >= 0.0


def test_oversized_and_hostile_inputs(runner):
    items = [(P, "x" * 1001), (P, "\ud800\udfff\ud800"), (P, "exit"), (P, "5"), (P, 12), (P, "nan")]
    out = runner.score_batch(items)
    assert out[0].error == "too_long"
    assert out[1] == Score(0.0, False, True)  # lone surrogates cross the pipe
    assert error_kind(out[2].error) == "worker_died"
    assert out[3].reward == 1.0
    assert error_kind(out[4].error) == "bad_input"
    assert error_kind(out[5].error) == "bad_return"


def test_math_hostile_strings_within_limit(tmp_path):
    from sortedrl.tasks.math import MathTask

    f = tmp_path / "m.jsonl"
    f.write_text('{"problem": "2+3?", "answer": "5"}\n')
    task = MathTask(path=str(f))
    p = Problem("m", "q", "5")
    hostile = [
        "\\boxed{9^{9^{9^{9}}}}",
        "\\boxed{" + "(" * 400 + ")" * 400 + "}",
        "\\boxed{" + "{" * 50_000 + "}" * 50_000 + "}",
        "y" * 1_000_000,
        "\ud800\\boxed{\udfff}",
        "so \\boxed{5}",
    ]
    timeout = 2.0
    with RewardRunner(task, timeout_s=timeout, workers=2, max_response_chars=2_000_000) as r:
        r.score_batch([(p, "\\boxed{5}")])  # start-up (imports) is not part of the limit
        t0 = time.monotonic()
        out = r.score_batch([(p, h) for h in hostile])
        elapsed = time.monotonic() - t0
    # Two items may time out; they run in parallel, each bounded by the limit.
    assert elapsed < 2 * timeout + SLACK
    assert all(s.reward == 0.0 for s in out[:-1])
    assert out[-1].correct
    assert out[0].error == "timeout"


def test_unpicklable_scorer_is_a_config_error():
    with pytest.raises(ConfigError, match="module-level"):
        RewardRunner(lambda p, r: 1.0, workers=1)


def test_workers_that_cannot_start_raise():
    pickle.dumps(Unloadable())
    r = RewardRunner(Unloadable(), workers=1, timeout_s=1.0)
    t0 = time.monotonic()
    with pytest.raises(RewardWorkerError, match="workers=0"):
        r.score_batch([(P, "5")])
    assert time.monotonic() - t0 < 60
    with pytest.raises(RuntimeError):
        r.score_batch([(P, "5")])


def test_close_is_idempotent():
    r = RewardRunner(toy_scorer, workers=1)
    r.close()
    r.close()
    with pytest.raises(RuntimeError, match="closed"):
        r.score_batch([])


def test_bad_settings():
    with pytest.raises(ConfigError):
        RewardRunner(toy_scorer, timeout_s=0)
    with pytest.raises(ConfigError):
        RewardRunner(toy_scorer, workers=-1)
    with pytest.raises(ConfigError):
        RewardRunner(42)


def test_load_reward_fn(tmp_path, monkeypatch):
    fn = load_reward_fn("sortedrl.tasks.countdown:score_response")
    p = SyntheticTask().problems("train", 1, seed=0)[0]
    assert fn(p, reference_solution(p)).correct
    assert load_reward_fn("sortedrl.tasks.countdown:SyntheticTask.score") is SyntheticTask.score
    with RewardRunner(fn, workers=0) as r:
        assert r.score(p, reference_solution(p)).reward == 1.0
    cases = {
        "no_colon_here": "expected 'package.module:function'",
        "a:b:c": "expected",
        ":f": "expected",
        "surely_missing_module_xyz:f": "not found",
        "sortedrl.tasks.countdown:nope": "no attribute",
        "sortedrl.tasks.countdown:ALPHABET": "not a function",
    }
    for spec, words in cases.items():
        with pytest.raises(ConfigError, match=words):
            load_reward_fn(spec)
    (tmp_path / "broken_reward_mod.py").write_text("raise ImportError('half installed')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match="half installed"):
        load_reward_fn("broken_reward_mod:f")


def test_interrupted_batch_leaves_the_runner_usable(runner, monkeypatch):
    import sortedrl.tasks.rewards as rewards

    real_wait = rewards.wait

    def interrupted(*args, **kwargs):
        monkeypatch.setattr(rewards, "wait", real_wait)
        raise KeyboardInterrupt

    monkeypatch.setattr(rewards, "wait", interrupted)
    with pytest.raises(KeyboardInterrupt):
        runner.score_batch([(P, "sleep"), (P, "sleep")])
    t0 = time.monotonic()
    assert [s.reward for s in runner.score_batch([(P, "5"), (P, "4")])] == [1.0, 0.0]
    assert time.monotonic() - t0 < TIMEOUT + SLACK
    assert len(runner._workers) == 2
