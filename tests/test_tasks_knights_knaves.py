import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sortedrl.errors import ConfigError
from sortedrl.tasks.knights_knaves import (
    REWARD_BAD_FORMAT,
    REWARD_CORRECT,
    REWARD_WRONG,
    KnightsKnavesTask,
    answer_block,
    generate_puzzle,
    parse_answer,
    reference_solution,
    solve,
    statement_holds,
    statement_text,
)

TASK = KnightsKnavesTask()


def test_deterministic_in_seed():
    assert TASK.problems("train", 20, seed=3) == TASK.problems("train", 20, seed=3)
    assert TASK.problems("train", 20, seed=3) != TASK.problems("train", 20, seed=4)


@pytest.mark.parametrize("n_people", range(2, 9))
def test_solutions_are_unique(n_people):
    rng = random.Random(n_people)
    for _ in range(15):
        names, statements, sol = generate_puzzle(rng, n_people)
        assert len(names) == len(set(names)) == n_people
        assert solve(statements) == [sol]
        # Knights' statements hold, knaves' statements fail.
        for i, s in enumerate(statements):
            assert statement_holds(s, sol) == sol[i]


def test_problem_meta_matches_solver():
    for p in TASK.problems("train", 40, seed=0):
        statements = [tuple(s) for s in p.meta["statements"]]
        assert solve(statements) == [tuple(p.meta["solution"])]
        for name in p.meta["names"]:
            assert name in p.prompt
        assert "<answer>" in p.prompt


def test_meta_survives_json():
    import json

    for p in TASK.problems("train", 10, seed=2):
        meta = json.loads(json.dumps(p.meta))
        q = type(p)(p.prompt_id, p.prompt, p.answer, meta)
        assert TASK.score(q, reference_solution(q)).correct
        assert reference_solution(q) == reference_solution(p)


def test_people_range_and_splits():
    t = KnightsKnavesTask(min_people=3, max_people=4)
    counts = {len(p.meta["names"]) for p in t.problems("train", 60, seed=0)}
    assert counts == {3, 4}
    train = {p.prompt for p in t.problems("train", 300, seed=0)}
    test = {p.prompt for p in t.problems("test", 50, seed=0)}
    assert not train & test
    with pytest.raises(ConfigError):
        KnightsKnavesTask(max_people=9)
    with pytest.raises(ConfigError):
        KnightsKnavesTask(min_people=1)


def test_statement_semantics():
    names = ["A", "B", "C"]
    assert statement_text(names, ("is", (1, False))) == "B is a knave"
    assert statement_text(names, ("if", (1, True), (2, False))) == (
        "if B is a knight then C is a knave"
    )
    assert statement_holds(("if", (1, True), (2, False)), (True, False, True))
    assert not statement_holds(("if", (1, True), (2, False)), (True, True, True))
    assert statement_holds(("same", (1, True), (2, True)), (True, False, False))
    assert statement_holds(("diff", (1, True), (2, True)), (True, True, False))
    assert statement_holds(("or", (1, False), (2, True)), (True, True, True))
    assert not statement_holds(("and", (1, False), (2, True)), (True, True, True))


def _problem():
    return TASK.problems("train", 1, seed=11)[0]


def test_reference_solution_scores_one():
    for p in TASK.problems("train", 30, seed=5):
        s = TASK.score(p, reference_solution(p))
        assert (s.reward, s.correct, s.format_ok) == (REWARD_CORRECT, True, True)


def test_wrong_answer_scores_zero():
    p = _problem()
    flipped = [not k for k in p.meta["solution"]]
    s = TASK.score(
        p, "thinking...\n<answer>\n" + answer_block(p.meta["names"], flipped) + "\n</answer>"
    )
    assert (s.reward, s.correct, s.format_ok) == (REWARD_WRONG, False, True)


def test_lenient_parsing():
    p = _problem()
    names, sol = p.meta["names"], p.meta["solution"]
    # Another order, other case, no numbering; the last block counts.
    lines = [
        f"{n.upper()} is a {'KNIGHT' if k else 'knave'}." for n, k in zip(names, sol, strict=True)
    ]
    wrong = answer_block(names, [not k for k in sol])
    text = (
        f"<answer>{wrong}</answer> on second thought <answer>{'; '.join(reversed(lines))}</answer>"
    )
    assert TASK.score(p, text).correct


@pytest.mark.parametrize(
    "make",
    [
        lambda p: "",
        lambda p: "I think everyone is a knight.",
        lambda p: p.answer,  # no tags
        lambda p: "<answer>" + p.answer,  # unclosed
        lambda p: p.answer + "</answer>",
        lambda p: "</answer>" + p.answer + "<answer>",  # reversed tags
        lambda p: "<answer>\n" + p.answer.split("\n", 1)[0] + "\n</answer>",  # someone missing
        lambda p: (
            "<answer>\n"
            + p.answer
            + "\n"
            + p.meta["names"][0]
            + " is a knight\n"
            + p.meta["names"][0]
            + " is a knave\n</answer>"
        ),  # contradictory
        lambda p: "<answer>" + "{" * 100_000 + "</answer>",
        lambda p: "\ud800<answer>\udfff</answer>",
        lambda p: "x" * 1_000_000,
    ],
)
def test_bad_format_scores_minus_one(make):
    p = _problem()
    s = TASK.score(p, make(p))
    assert (s.reward, s.correct, s.format_ok) == (REWARD_BAD_FORMAT, False, False)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=400))
def test_parse_never_raises(text):
    p = _problem()
    assert parse_answer(text, p.meta["names"]) is None or len(p.meta["names"]) > 0
    assert TASK.score(p, text).reward in (REWARD_BAD_FORMAT, REWARD_WRONG, REWARD_CORRECT)
