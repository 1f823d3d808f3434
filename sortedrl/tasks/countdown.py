"""A synthetic countdown task (arithmetic, harder for a tiny model than `reverse`).

Problem: start from `n` and subtract `k` while the result stays non-negative; write every
intermediate result on its own line, then the answer (`n mod k`) after `=`::

    prompt:   47-5:
    response: 42
              37
              32
              27
              22
              17
              12
              7
              2
              =2

The response is `"\\n".join(results) + "\\n=" + answer`, one line per step. The number of steps
`n // k` is drawn from a long-tailed (Zipf-like) distribution on `1..max_steps`, so response
lengths spread from 4 characters (one step) to about 90 (24 steps) with most problems short:
a small-scale copy of the long-tailed lengths of reasoning models. Each line depends only on
the line before it and on `k`, so a tiny model can learn the procedure, and longer problems are
harder simply because there are more steps to get wrong (the "short is easy" correlation that
length-sorted scheduling exploits).

The vocabulary is :data:`ALPHABET` (digits, ``-``, ``:``, ``=``, newline), small enough for a
character-level tokenizer.

Reward (see :meth:`SyntheticTask.score`):

* ``1.0``  correct: the response has the format above, every step line is right, and the answer
  is right;
* ``0.1``  well formed (lines of digits then ``=`` digits) but some step or the answer is wrong;
* ``0.0``  malformed.

Requiring the whole chain, not only the answer, keeps the worked solution (and so the length
distribution) from collapsing into a guess.
"""

from __future__ import annotations

import bisect
import itertools
import random
import re
import zlib
from dataclasses import dataclass
from functools import lru_cache

from sortedrl.errors import ConfigError
from sortedrl.tasks.base import Problem, Score

ALPHABET = "0123456789-:=\n"
"""Every character a prompt or a reference solution of this task uses."""

REWARD_CORRECT = 1.0
REWARD_FORMAT = 0.1
REWARD_BAD = 0.0

# Lines of digits, then "=digits"; trailing whitespace tolerated. Linear-time (no nesting).
_RESPONSE_RE = re.compile(r"((?:[0-9]{1,6}\n){0,200})=([0-9]{1,6})\s*")
_MAX_PARSE_CHARS = 2000


def _split_of(n: int, k: int, test_percent: int) -> str:
    """Stable train/test assignment of the problem (n, k): a hash, independent of any seed."""
    h = zlib.crc32(f"countdown:{n}-{k}".encode()) % 100
    return "test" if h < test_percent else "train"


@lru_cache(maxsize=16)
def _pool(
    split: str, max_steps: int, min_k: int, max_k: int, tail: float, test_percent: int
) -> tuple[tuple[tuple[int, int], ...], tuple[float, ...]]:
    """All (n, k) of `split` with their probabilities' running sum.

    P(n, k) = P(steps) * P(k) * P(n mod k) with steps ~ s**-tail, k and the remainder uniform.
    """
    pairs: list[tuple[int, int]] = []
    weights: list[float] = []
    for s in range(1, max_steps + 1):
        for k in range(min_k, max_k + 1):
            for r in range(k):
                if _split_of(s * k + r, k, test_percent) == split:
                    pairs.append((s * k + r, k))
                    weights.append(s ** (-tail) / k)
    return tuple(pairs), tuple(itertools.accumulate(weights))


def make_problem(n: int, k: int, prompt_id: str) -> Problem:
    if not (k >= 2 and n >= k):
        raise ValueError(f"need k >= 2 and n >= k, got n={n}, k={k}")
    return Problem(
        prompt_id=prompt_id,
        prompt=f"{n}-{k}:",
        answer=str(n % k),
        meta={"n": n, "k": k, "steps": n // k},
    )


def reference_solution(problem: Problem) -> str:
    """The response a perfect model writes (for supervised warm-start)."""
    n, k = int(problem.meta["n"]), int(problem.meta["k"])
    lines = [str(v) for v in range(n - k, -1, -k)]
    return "\n".join(lines) + "\n=" + str(n % k)


def score_response(problem: Problem, response: str) -> Score:
    """Score one response to a countdown problem (module-level, picklable)."""
    if not isinstance(response, str) or len(response) > _MAX_PARSE_CHARS:
        return Score(REWARD_BAD, False, False)
    m = _RESPONSE_RE.fullmatch(response)
    if m is None:
        return Score(REWARD_BAD, False, False)
    n, k = int(problem.meta["n"]), int(problem.meta["k"])
    got = [int(x) for x in m.group(1).split("\n") if x]
    want = list(range(n - k, -1, -k))
    correct = got == want and m.group(2) == problem.answer
    return Score(REWARD_CORRECT if correct else REWARD_FORMAT, correct, True)


@dataclass(frozen=True)
class SyntheticTask:
    """Countdown problems; see the module docstring.

    `max_steps` bounds the number of steps (lines) of a solution, `min_k`/`max_k` the step
    size, `tail` the exponent of the step-count distribution P(s) ~ s**-tail (larger: shorter
    problems), `test_percent` the share of (n, k) pairs reserved for the test split.
    """

    max_steps: int = 24
    min_k: int = 2
    max_k: int = 9
    tail: float = 1.0
    test_percent: int = 15
    name: str = "countdown"

    def __post_init__(self) -> None:
        if not 1 <= self.max_steps <= 100:
            raise ConfigError(f"synthetic task: max_steps must be in 1..100, got {self.max_steps}")
        if not 2 <= self.min_k <= self.max_k <= 20:
            raise ConfigError(
                f"synthetic task: need 2 <= min_k <= max_k <= 20, got {self.min_k}, {self.max_k}"
            )
        if not 0 < self.test_percent < 100:
            raise ConfigError(
                f"synthetic task: test_percent must be in 1..99, got {self.test_percent}"
            )
        if not self.tail >= 0:
            raise ConfigError(f"synthetic task: tail must be >= 0, got {self.tail}")

    @property
    def alphabet(self) -> str:
        return ALPHABET

    def problems(self, split: str, n: int, seed: int) -> list[Problem]:
        if split not in ("train", "test"):
            raise ConfigError(f"split must be 'train' or 'test', got {split!r}")
        pairs, cum = _pool(
            split, self.max_steps, self.min_k, self.max_k, float(self.tail), self.test_percent
        )
        if not pairs:
            raise ConfigError(f"synthetic task: no {split} problems with these settings")
        rng = random.Random(f"synthetic/{split}/{seed}")
        total = cum[-1]
        out = []
        for i in range(n):
            j = min(bisect.bisect_right(cum, rng.random() * total), len(pairs) - 1)
            value, k = pairs[j]
            out.append(make_problem(value, k, f"synthetic/{split}/{seed}/{i}"))
        return out

    def score(self, problem: Problem, response: str) -> Score:
        return score_response(problem, response)

    def reference_solution(self, problem: Problem) -> str:
        return reference_solution(problem)
