"""The one scorer of a run: training rewards and every evaluation go through it, and the one
place where generations are scored (`score_generations`: decode, score against the problem),
used by the local run, the Ray replicas and evaluation alike.

`make_scorer(task_cfg, task)` returns a `RewardRunner` (see `sortedrl.tasks.rewards`) that
scores with your own `task_cfg.reward_fns` (weighted, the task's verifier judging accuracy)
when they are set, else with the task's own verifier, under the size limit always and, in
worker processes, under the hard time limit `task_cfg.reward_timeout_s`. Worker processes are
used for whatever is not a built-in linear-time verifier (the math-verify of the `math` and
`dataset` tasks, your own reward_fns), or as `task_cfg.reward_workers` says.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from sortedrl.tasks.base import Problem, Score
from sortedrl.tasks.registry import TASKS

#: Reward workers when `task.reward_workers` is empty and the scorer is untrusted.
DEFAULT_SANDBOX_WORKERS = 2


class Scorer(Protocol):
    def score_batch(self, items: Sequence[tuple[Any, ...]]) -> list[Score]:
        """One Score per (problem, response), in order."""
        ...

    def close(self) -> None:
        """Stop the worker processes (idempotent)."""
        ...


def sandbox_workers(task_cfg: Any) -> int:
    """Worker processes for `task_cfg`: its `reward_workers`, or the default by what scores."""
    if task_cfg.reward_workers is not None:
        return int(task_cfg.reward_workers)
    untrusted = bool(task_cfg.reward_fns) or TASKS[task_cfg.name].sandboxed
    return DEFAULT_SANDBOX_WORKERS if untrusted else 0


def reward_target(task_cfg: Any, task: Any) -> Any:
    """What scores one response: the weighted user functions, or else the task itself."""
    if task_cfg.reward_fns:
        from sortedrl.tasks.user_rewards import load_reward_fns

        return load_reward_fns(task_cfg.reward_fns, task_cfg.reward_weights, judge=task)
    return task


def make_scorer(task_cfg: Any, task: Any) -> Scorer:
    """A `Scorer` for `task` per the `task` section (`reward_fns`, timeout, workers)."""
    from sortedrl.tasks.rewards import RewardRunner

    return RewardRunner(
        reward_target(task_cfg, task),
        timeout_s=task_cfg.reward_timeout_s,
        workers=sandbox_workers(task_cfg),
    )


def decode(tokenizer: Any, token_ids: Sequence[int] | None) -> str:
    """The text of a response, as the scorer sees it."""
    return tokenizer.decode(list(token_ids or []), skip_special_tokens=True)


def score_generations(
    scorer: Scorer, tokenizer: Any, items: Sequence[tuple[Problem, Sequence[int] | None]]
) -> list[Score]:
    """One Score per (problem, response token ids), in order: each response decoded and scored
    against its problem."""
    if not items:
        return []
    # The token ids go along for reward functions that take TRL's `completion_ids`.
    return scorer.score_batch(
        [(problem, decode(tokenizer, ids), list(ids or [])) for problem, ids in items]
    )
