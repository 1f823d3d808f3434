"""What a task is: problems to prompt with and a verifier that scores responses.

Scoring functions must be pure and picklable (module-level): they run in a separate process
under time and size limits, because model output is untrusted input.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class Problem:
    prompt_id: str
    prompt: str  # the text given to the model, before any chat template
    answer: str  # the reference answer the verifier checks against
    meta: dict[str, Any] = field(default_factory=dict)


#: One reward function's share of a Score: (its name, its value or None when it gave none,
#: its failure as "<kind>: <message>" or None).
RewardPart = tuple[str, float | None, str | None]


@dataclass(frozen=True)
class Score:
    reward: float
    correct: bool
    format_ok: bool
    error: str | None = None  # set when scoring failed (timeout, crash, oversized output)
    parts: tuple[RewardPart, ...] = ()  # your reward functions' shares, one per function


class Task(Protocol):
    name: str

    def problems(self, split: str, n: int, seed: int) -> list[Problem]:
        """`n` problems of `split` ('train' or 'test'), deterministic in `seed`."""
        ...

    def score(self, problem: Problem, response: str) -> Score:
        """Score one response. Runs in a worker process; must not rely on global state."""
        ...
