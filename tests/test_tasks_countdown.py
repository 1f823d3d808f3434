import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sortedrl.errors import ConfigError
from sortedrl.tasks.countdown import (
    ALPHABET,
    REWARD_BAD,
    REWARD_CORRECT,
    REWARD_FORMAT,
    SyntheticTask,
    make_problem,
    reference_solution,
)

TASK = SyntheticTask()


def test_deterministic_in_seed():
    a = TASK.problems("train", 200, seed=7)
    b = TASK.problems("train", 200, seed=7)
    c = TASK.problems("train", 200, seed=8)
    assert a == b
    assert [p.prompt for p in a] != [p.prompt for p in c]
    assert len({p.prompt_id for p in a}) == 200


def test_train_and_test_are_disjoint():
    train = {p.prompt for p in TASK.problems("train", 3000, seed=0)}
    test = {p.prompt for p in TASK.problems("test", 1000, seed=0)}
    assert train and test and not train & test


def test_reference_solutions_are_correct_and_small():
    problems = TASK.problems("train", 1000, seed=1)
    for p in problems:
        sol = reference_solution(p)
        assert TASK.score(p, sol).reward == REWARD_CORRECT
        assert TASK.reference_solution(p) == sol
        assert set(p.prompt + sol) <= set(ALPHABET)
        assert len(p.prompt) <= 40 and len(sol) <= 200
        assert sol.endswith("=" + p.answer)


def test_length_spread_is_long_tailed():
    lengths = sorted(len(reference_solution(p)) for p in TASK.problems("train", 1000, seed=0))
    assert lengths[-1] >= 5 * lengths[0]
    p10, p50, p90 = lengths[100], lengths[500], lengths[900]
    assert p90 >= 5 * p10
    # Long tail: the mean is well above the median.
    assert statistics.mean(lengths) > 1.3 * p50


def test_example_format():
    p = make_problem(47, 5, "x")
    assert p.prompt == "47-5:" and p.answer == "2"
    assert reference_solution(p) == "42\n37\n32\n27\n22\n17\n12\n7\n2\n=2"
    assert TASK.score(p, "42\n37\n32\n27\n22\n17\n12\n7\n2\n=2\n").correct  # trailing newline ok


@pytest.mark.parametrize(
    "response, reward",
    [
        ("42\n37\n32\n27\n22\n17\n12\n7\n2\n=3", REWARD_FORMAT),  # wrong answer
        ("42\n37\n32\n27\n22\n17\n11\n7\n2\n=2", REWARD_FORMAT),  # a wrong step
        ("=2", REWARD_FORMAT),  # right answer, no steps
        ("42\n37\n2\n=2", REWARD_FORMAT),  # skipped steps
        ("", REWARD_BAD),
        ("2", REWARD_BAD),
        ("42\n37\n=", REWARD_BAD),
        ("hello =2", REWARD_BAD),
        ("42\n\n37\n=2", REWARD_BAD),
        ("9" * 10_000 + "\n=2", REWARD_BAD),
    ],
)
def test_scores_wrong_and_garbage(response, reward):
    p = make_problem(47, 5, "x")
    s = TASK.score(p, response)
    assert s.reward == reward
    assert not s.correct
    assert s.format_ok == (reward == REWARD_FORMAT)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=ALPHABET + "ab \ud800", max_size=300))
def test_never_raises_on_arbitrary_text(response):
    s = TASK.score(make_problem(13, 2, "x"), response)
    assert s.reward in (REWARD_BAD, REWARD_FORMAT, REWARD_CORRECT)


def test_options_and_errors():
    short = SyntheticTask(max_steps=4, max_k=3)
    for p in short.problems("train", 100, seed=0):
        assert p.meta["steps"] <= 4 and p.meta["k"] <= 3
    with pytest.raises(ConfigError):
        SyntheticTask(max_steps=0)
    with pytest.raises(ConfigError):
        SyntheticTask(min_k=1)
    with pytest.raises(ConfigError):
        TASK.problems("valid", 1, seed=0)
    assert TASK.alphabet == ALPHABET
