"""The one scorer of a run: training rewards and every evaluation go through it.

`make_scorer(task_cfg, task)` returns a `RewardRunner` (see `sortedrl.tasks.rewards`) that
scores with `task_cfg.reward_fn` when one is set, else with the task's own verifier, under the
size limit always and, in worker processes, under the hard time limit
`task_cfg.reward_timeout_s`. Worker processes are used for whatever is not a built-in
linear-time verifier (math, your own reward_fn), or as `task_cfg.reward_workers` says.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from sortedrl.tasks.base import Problem, Score

#: Reward workers when `task.reward_workers` is empty and the scorer is untrusted.
DEFAULT_SANDBOX_WORKERS = 2


class Scorer(Protocol):
    def score_batch(self, items: Sequence[tuple[Problem, str]]) -> list[Score]:
        """One Score per (problem, response), in order."""
        ...

    def close(self) -> None:
        """Stop the worker processes (idempotent)."""
        ...


def sandbox_workers(task_cfg: Any) -> int:
    """Worker processes for `task_cfg`: its `reward_workers`, or the default by what scores."""
    if task_cfg.reward_workers is not None:
        return int(task_cfg.reward_workers)
    untrusted = bool(task_cfg.reward_fn) or task_cfg.name == "math"
    return DEFAULT_SANDBOX_WORKERS if untrusted else 0


def make_scorer(task_cfg: Any, task: Any) -> Scorer:
    """A `Scorer` for `task` per the `task` section (`reward_fn`, timeout, workers)."""
    from sortedrl.tasks.rewards import RewardRunner, load_reward_fn

    target: Any = load_reward_fn(task_cfg.reward_fn) if task_cfg.reward_fn else task
    return RewardRunner(
        target, timeout_s=task_cfg.reward_timeout_s, workers=sandbox_workers(task_cfg)
    )
