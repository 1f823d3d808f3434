"""The embedded default task: reverse a string of letters."""

from __future__ import annotations

import pytest

from sortedrl.errors import ConfigError
from sortedrl.tasks.registry import get_task
from sortedrl.tasks.reverse import ALPHABET, ReverseTask, make_problem, score_response


def test_problems_are_deterministic_and_splits_disjoint():
    task = ReverseTask()
    a = task.problems("train", 500, seed=3)
    assert a == task.problems("train", 500, seed=3)
    assert a != task.problems("train", 500, seed=4)
    test = {p.prompt for p in task.problems("test", 500, seed=3) if p.meta["n"] >= 6}
    train = {p.prompt for p in a if p.meta["n"] >= 6}
    assert not (test & train)  # long random strings never repeat across splits
    assert all(set(p.prompt) <= set(ALPHABET) for p in a)


def test_lengths_spread_over_5x_with_a_long_tail():
    lengths = sorted(p.meta["n"] for p in ReverseTask().problems("train", 2000, seed=0))
    p10, p50, p99 = (lengths[int(q * len(lengths))] for q in (0.1, 0.5, 0.99))
    assert p50 == pytest.approx(6, abs=1)
    assert lengths[-1] / max(1, p10) >= 5
    assert p99 >= 3 * p50  # the tail


@pytest.mark.parametrize(
    ("response", "reward", "correct"),
    [
        ("xdqbg", 1.0, True),
        ("  xdqbg\n", 1.0, True),
        ("xdqbz", 0.5 * 4 / 5, False),  # four of five positions right
        ("xdqbgaaaaa", 0.5 * 5 / 10, False),  # too long: compared over the longer length
        ("xd", 0.5 * 2 / 5, False),
        ("xdq bg", 0.0, False),  # not letters only
        ("", 0.0, False),
        ("x" * 1000, 0.0, False),  # far too long: not parsed
        ("\udcff", 0.0, False),
    ],
)
def test_score(response, reward, correct):
    s = score_response(make_problem("gbqdx", "p"), response)
    assert s.reward == pytest.approx(reward)
    assert s.correct is correct


def test_registry_and_bad_settings():
    assert isinstance(get_task("reverse"), ReverseTask)
    with pytest.raises(ConfigError, match="max_len"):
        ReverseTask(min_len=5, max_len=2)
    with pytest.raises(ConfigError, match="split"):
        ReverseTask().problems("dev", 1, 0)
