"""Knights and Knaves logic puzzles: a seeded generator, a brute-force solver, a verifier.

Every inhabitant is a knight (always tells the truth) or a knave (always lies) and makes one
statement about the others. A puzzle is kept only if exactly one assignment of identities is
consistent with all statements (checked by the solver over all 2**n assignments), so the
answer is unique.

Statement templates (A says ...): "B is a knight" / "B is a knave", "B is a knight and C is a
knave", "B is a knight or C is a knave", "if B is a knight then C is a knave", "B and C are of
the same type", "B and C are of different types" (every literal may be knight or knave).

The model is asked to reason and then give the answer in a fixed block::

    <answer>
    (1) Zoey is a knight
    (2) Oliver is a knave
    </answer>

Reward (see :func:`score_response`):

* ``-1.0`` bad format: no ``<answer>...</answer>`` block, or a person of the puzzle is missing
  from it, or is named both a knight and a knave;
* ``0.0`` well formed but some identity is wrong;
* ``1.0`` every identity right.
"""

from __future__ import annotations

import itertools
import random
import re
import zlib
from dataclasses import dataclass
from typing import Any

from sortedrl.errors import ConfigError
from sortedrl.tasks.base import Problem, Score

REWARD_CORRECT = 1.0
REWARD_WRONG = 0.0
REWARD_BAD_FORMAT = -1.0

NAMES = (
    "Zoey", "Oliver", "Mia", "Jack", "Sofia", "Liam", "Emma", "Noah", "Ava", "Lucas",
    "Chloe", "Ethan", "Grace", "Henry", "Isla", "Leo", "Luna", "Mason", "Nora", "Owen",
    "Ruby", "Samuel", "Aria", "Daniel", "Ella", "Felix", "Hazel", "Isaac", "Ivy", "James",
)  # fmt: skip

# Statement kinds and how many people they mention.
_KINDS = {"is": 1, "and": 2, "or": 2, "if": 2, "same": 2, "diff": 2}

MAX_RESPONSE_CHARS = 200_000  # longer responses are scored as bad format without parsing
MIN_PEOPLE, MAX_PEOPLE = 2, 8

PROMPT_TEMPLATE = (
    "A very special island is inhabited only by knights and knaves. Knights always tell the "
    "truth, and knaves always lie. You meet {n} inhabitants: {names}. {statements} "
    "So who is a knight and who is a knave?\n"
    "Think step by step. Then give your final answer inside <answer> </answer> tags, one line "
    "per inhabitant in the order above, in the form:\n"
    "<answer>\n{form}\n</answer>"
)

# A statement: (kind, (person, claims_knight), ...); e.g. ("or", (1, True), (2, False)).
Statement = tuple[Any, ...]


def _lit(names: list[str], lit: tuple[int, bool]) -> str:
    return f"{names[lit[0]]} is a {'knight' if lit[1] else 'knave'}"


def statement_text(names: list[str], st: Statement) -> str:
    kind = st[0]
    if kind == "is":
        return _lit(names, st[1])
    a, b = st[1], st[2]
    if kind == "and":
        return f"{_lit(names, a)} and {_lit(names, b)}"
    if kind == "or":
        return f"{_lit(names, a)} or {_lit(names, b)}"
    if kind == "if":
        return f"if {_lit(names, a)} then {_lit(names, b)}"
    if kind == "same":
        return f"{names[a[0]]} and {names[b[0]]} are of the same type"
    if kind == "diff":
        return f"{names[a[0]]} and {names[b[0]]} are of different types"
    raise ValueError(f"unknown statement kind {kind!r}")


def statement_holds(st: Statement, knights: tuple[bool, ...]) -> bool:
    """Truth of a statement under an assignment (`knights[i]` is True when i is a knight)."""

    def lit(x: tuple[int, bool]) -> bool:
        return knights[x[0]] == x[1]

    kind = st[0]
    if kind == "is":
        return lit(st[1])
    a, b = st[1], st[2]
    if kind == "and":
        return lit(a) and lit(b)
    if kind == "or":
        return lit(a) or lit(b)
    if kind == "if":
        return (not lit(a)) or lit(b)
    if kind == "same":
        return knights[a[0]] == knights[b[0]]
    if kind == "diff":
        return knights[a[0]] != knights[b[0]]
    raise ValueError(f"unknown statement kind {kind!r}")


def solve(statements: list[Statement]) -> list[tuple[bool, ...]]:
    """Every consistent assignment: person i's statement holds exactly when i is a knight."""
    n = len(statements)
    return [
        knights
        for knights in itertools.product((True, False), repeat=n)
        if all(statement_holds(st, knights) == knights[i] for i, st in enumerate(statements))
    ]


def _random_statement(rng: random.Random, speaker: int, n: int) -> Statement:
    others = [i for i in range(n) if i != speaker]
    kind = rng.choice(list(_KINDS)) if n >= 3 else rng.choice(["is", "and", "or", "if"])
    if _KINDS[kind] == 1:
        return ("is", (rng.choice(others), rng.random() < 0.5))
    if kind in ("same", "diff"):
        a, b = rng.sample(others, 2)
        return (kind, (a, True), (b, True))
    # Two literals about two different people; the speaker may mention themself in 2-person
    # puzzles only (otherwise there is no second person to talk about).
    pool = others if n >= 3 else list(range(n))
    a, b = rng.sample(pool, 2)
    return (kind, (a, rng.random() < 0.5), (b, rng.random() < 0.5))


def generate_puzzle(
    rng: random.Random, n_people: int, max_tries: int = 100_000
) -> tuple[list[str], list[Statement], tuple[bool, ...]]:
    """(names, statements, unique solution); statements are regenerated until unique."""
    if not MIN_PEOPLE <= n_people <= MAX_PEOPLE:
        raise ConfigError(f"knights_knaves: people must be in 2..8, got {n_people}")
    names = rng.sample(NAMES, n_people)
    for _ in range(max_tries):
        statements = [_random_statement(rng, i, n_people) for i in range(n_people)]
        sols = solve(statements)
        if len(sols) == 1:
            return names, statements, sols[0]
    raise RuntimeError(
        f"no unique {n_people}-person puzzle in {max_tries} tries"
    )  # pragma: no cover


def answer_block(names: list[str], knights: tuple[bool, ...] | list[bool]) -> str:
    lines = [
        f"({i + 1}) {name} is a {'knight' if k else 'knave'}"
        for i, (name, k) in enumerate(zip(names, knights, strict=True))
    ]
    return "\n".join(lines)


def _quote(s: str) -> str:
    return s[0].upper() + s[1:]


def make_problem(
    names: list[str], statements: list[Statement], solution: tuple[bool, ...], prompt_id: str
) -> Problem:
    n = len(names)
    said = " ".join(
        f'{names[i]} says: "{_quote(statement_text(names, st))}."'
        for i, st in enumerate(statements)
    )
    name_list = ", ".join(names[:-1]) + " and " + names[-1]
    form = "\n".join(f"({i + 1}) {name} is a knight/knave" for i, name in enumerate(names))
    prompt = PROMPT_TEMPLATE.format(n=n, names=name_list, statements=said, form=form)
    return Problem(
        prompt_id=prompt_id,
        prompt=prompt,
        answer=answer_block(names, solution),
        meta={
            "names": list(names),
            "solution": [bool(k) for k in solution],
            # JSON-friendly: [kind, [person, claims_knight], ...]
            "statements": [[st[0], *[list(x) for x in st[1:]]] for st in statements],
        },
    )


def reference_solution(problem: Problem) -> str:
    """A short worked solution with the answer block (for supervised warm-start)."""
    names = list(problem.meta["names"])
    sol = tuple(problem.meta["solution"])
    statements = [tuple(st) for st in problem.meta["statements"]]
    lines = ["Check the only consistent assignment statement by statement."]
    for i, st in enumerate(statements):
        holds = statement_holds(st, sol)
        who = "a knight" if sol[i] else "a knave"
        lines.append(
            f'{names[i]} is {who}, so the statement "{statement_text(names, st)}" is '
            f"{'true' if holds else 'false'}, as it must be."
        )
    lines.append("Any other assignment contradicts some statement.")
    return "\n".join(lines) + "\n<answer>\n" + problem.answer + "\n</answer>"


_ID_RE = re.compile(
    r"\b([A-Za-z]{1,40})\s{0,5}(?:is|was|:|-)\s{0,5}(?:an?\s{1,5})?(knight|knave)", re.I
)


def parse_answer(response: str, names: list[str]) -> list[bool] | None:
    """Identities from the last `<answer>` block, or None when absent or unparseable."""
    if not isinstance(response, str) or len(response) > MAX_RESPONSE_CHARS:
        return None
    end = response.rfind("</answer>")
    if end < 0:
        return None
    start = response.rfind("<answer>", 0, end)
    if start < 0:
        return None
    block = response[start + len("<answer>") : end]
    if len(block) > 20_000:
        return None
    found: dict[str, set[bool]] = {}
    lowered = {name.lower(): name for name in names}
    for m in _ID_RE.finditer(block):
        name = lowered.get(m.group(1).lower())
        if name is not None:
            found.setdefault(name, set()).add(m.group(2).lower() == "knight")
    out = []
    for name in names:
        got = found.get(name)
        if got is None or len(got) != 1:
            return None
        out.append(next(iter(got)))
    return out


def score_response(problem: Problem, response: str) -> Score:
    """-1 bad format, 0 wrong, 1 right (module-level, picklable)."""
    got = parse_answer(response, list(problem.meta["names"]))
    if got is None:
        return Score(REWARD_BAD_FORMAT, False, False)
    correct = got == [bool(k) for k in problem.meta["solution"]]
    return Score(REWARD_CORRECT if correct else REWARD_WRONG, correct, True)


@dataclass(frozen=True)
class KnightsKnavesTask:
    """Seeded puzzles with `min_people..max_people` inhabitants (uniform over the count).

    Train and test are disjoint: a puzzle belongs to the split its text hashes to, so the two
    never share a prompt (`test_percent` of all puzzles go to test).
    """

    min_people: int = 2
    max_people: int = 8
    test_percent: int = 10
    name: str = "knights_knaves"

    def __post_init__(self) -> None:
        if not MIN_PEOPLE <= self.min_people <= self.max_people <= MAX_PEOPLE:
            raise ConfigError(
                "knights_knaves: need 2 <= min_people <= max_people <= 8, "
                f"got {self.min_people}, {self.max_people}"
            )
        if not 0 < self.test_percent < 100:
            raise ConfigError(
                f"knights_knaves: test_percent must be in 1..99, got {self.test_percent}"
            )

    def problems(self, split: str, n: int, seed: int) -> list[Problem]:
        if split not in ("train", "test"):
            raise ConfigError(f"split must be 'train' or 'test', got {split!r}")
        rng = random.Random(f"knights_knaves/{split}/{seed}")
        out: list[Problem] = []
        while len(out) < n:
            n_people = rng.randint(self.min_people, self.max_people)
            names, statements, sol = generate_puzzle(rng, n_people)
            p = make_problem(names, statements, sol, f"knights_knaves/{split}/{seed}/{len(out)}")
            in_test = zlib.crc32(p.prompt.encode()) % 100 < self.test_percent
            if in_test == (split == "test"):
                out.append(p)
        return out

    def score(self, problem: Problem, response: str) -> Score:
        return score_response(problem, response)

    def reference_solution(self, problem: Problem) -> str:
        return reference_solution(problem)
