"""The embedded default task: reverse a string of letters.

    prompt:   gbqdx:
    response: xdqbg

String lengths are drawn from a capped log-normal (median 6, up to 40 letters), so response
lengths spread over more than 10x with a long tail, like the lengths of reasoning models in
miniature. Every output letter depends on one input letter, so a ~1M-parameter model learns
the procedure from a short supervised warm start; long strings stay hard because each letter
is another chance to slip (the "short is easy" correlation that length-sorted scheduling
exploits), which leaves RL room to improve. Strings are random, so held-out problems are new
strings, never seen in training.

Reward (see :func:`score_response`):

* ``1.0``  the exact reversal;
* ``0.5 * f`` a string of letters whose fraction ``f`` of positions match the reversal
  (compared position by position over the longer of the two lengths);
* ``0.0``  anything else (other characters, or a response far longer than the answer).
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass

from sortedrl.errors import ConfigError
from sortedrl.tasks.base import Problem, Score

LETTERS = "abcdefghijklmnopqrstuvwxyz"
ALPHABET = LETTERS + ":"
"""Every character a prompt or a reference solution of this task uses."""


def make_problem(text: str, prompt_id: str) -> Problem:
    return Problem(prompt_id=prompt_id, prompt=f"{text}:", answer=text[::-1], meta={"n": len(text)})


def reference_solution(problem: Problem) -> str:
    return problem.answer


def score_response(problem: Problem, response: str) -> Score:
    """Score one response (module-level, picklable)."""
    want = problem.answer
    if not isinstance(response, str) or len(response) > 4 * len(want) + 16:
        return Score(0.0, False, False)
    got = response.strip()
    if not got or any(c not in LETTERS for c in got):
        return Score(0.0, False, False)
    if got == want:
        return Score(1.0, True, True)
    hits = sum(a == b for a, b in zip(got, want, strict=False))
    return Score(0.5 * hits / max(len(got), len(want)), False, True)


@dataclass(frozen=True)
class ReverseTask:
    """Reverse a random string of `min_len`..`max_len` letters (log-normal, `median_len`)."""

    median_len: float = 6.0
    sigma: float = 0.8
    min_len: int = 1
    max_len: int = 40
    name: str = "reverse"

    def __post_init__(self) -> None:
        if not 1 <= self.min_len <= self.max_len <= 200:
            raise ConfigError(
                f"reverse task: need 1 <= min_len <= max_len <= 200, got "
                f"{self.min_len}, {self.max_len}"
            )
        if not (self.median_len > 0 and self.sigma >= 0):
            raise ConfigError("reverse task: need median_len > 0 and sigma >= 0")

    @property
    def alphabet(self) -> str:
        return ALPHABET

    def problems(self, split: str, n: int, seed: int) -> list[Problem]:
        if split not in ("train", "test"):
            raise ConfigError(f"split must be 'train' or 'test', got {split!r}")
        # Seeded by split and seed through a stable hash, so train and test never share a draw.
        digest = hashlib.sha256(f"reverse/{split}/{seed}".encode()).digest()
        rng = random.Random(int.from_bytes(digest[:8], "big"))
        out = []
        for i in range(n):
            length = round(self.median_len * math.exp(self.sigma * rng.gauss(0.0, 1.0)))
            length = min(self.max_len, max(self.min_len, length))
            text = "".join(rng.choice(LETTERS) for _ in range(length))
            out.append(make_problem(text, f"reverse/{split}/{seed}/{i}"))
        return out

    def score(self, problem: Problem, response: str) -> Score:
        return score_response(problem, response)

    def reference_solution(self, problem: Problem) -> str:
        return reference_solution(problem)
