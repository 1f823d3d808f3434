"""The scorer of a run: the task's verifier or your reward functions, under the sandbox's limits.

`make_scorer(task_cfg, task)` returns a :class:`~sortedrl.tasks.rewards.RewardRunner`
(``score_batch(items) -> list[Score]`` over ``(Problem, response)`` pairs, and ``close()``).
Untrusted code runs in worker processes under `task.reward_timeout_s` per call: math-verify
(the `math` and `dataset` verifiers) and your own `task.reward_fns`. The built-in linear-time
verifiers of the generated tasks score in-process (``task.reward_workers`` overrides both).
"""

from __future__ import annotations

from typing import Any

from sortedrl.tasks.rewards import RewardRunner

SANDBOXED_TASKS = ("math", "dataset")  # their verifier runs sympy on model output
DEFAULT_WORKERS = 2


def reward_target(task_cfg: Any, task: Any) -> Any:
    """What scores one response: the weighted user functions, or else the task itself."""
    if task_cfg.reward_fns:
        from sortedrl.tasks.user_rewards import load_reward_fns

        return load_reward_fns(task_cfg.reward_fns, task_cfg.reward_weights, judge=task)
    return task


def scorer_workers(task_cfg: Any) -> int:
    """Reward worker processes: `task.reward_workers`, or the default for this task."""
    if task_cfg.reward_workers is not None:
        return int(task_cfg.reward_workers)
    untrusted = bool(task_cfg.reward_fns) or task_cfg.name in SANDBOXED_TASKS
    return DEFAULT_WORKERS if untrusted else 0


def make_scorer(task_cfg: Any, task: Any) -> RewardRunner:
    """A scorer for `task` per the `task` config section; close it when done."""
    return RewardRunner(
        reward_target(task_cfg, task),
        timeout_s=task_cfg.reward_timeout_s,
        workers=scorer_workers(task_cfg),
    )
