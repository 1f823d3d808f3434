"""Tasks (problems and verifiers) and the reward sandbox.

Import-light: the math task imports math-verify only when it scores.
"""

from sortedrl.tasks.base import Problem, Score, Task
from sortedrl.tasks.registry import TASK_NAMES, get_task
from sortedrl.tasks.rewards import RewardRunner
from sortedrl.tasks.user_rewards import load_reward_fn

__all__ = ["TASK_NAMES", "Problem", "RewardRunner", "Score", "Task", "get_task", "load_reward_fn"]
