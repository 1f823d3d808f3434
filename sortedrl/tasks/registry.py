"""Tasks by name: `get_task("reverse")`, `get_task("math", path="train.jsonl")`."""

from __future__ import annotations

import inspect
from typing import Any

from sortedrl.errors import ConfigError


def _task_classes() -> dict[str, type]:
    from sortedrl.tasks.countdown import SyntheticTask
    from sortedrl.tasks.knights_knaves import KnightsKnavesTask
    from sortedrl.tasks.math import MathTask
    from sortedrl.tasks.reverse import ReverseTask

    return {
        "reverse": ReverseTask,
        "countdown": SyntheticTask,
        "knights_knaves": KnightsKnavesTask,
        "math": MathTask,
    }


TASK_NAMES = ("reverse", "countdown", "knights_knaves", "math")


def get_task(name: str, **kwargs: Any) -> Any:
    """A task object by name; keyword arguments go to its constructor."""
    classes = _task_classes()
    if name not in classes:
        raise ConfigError(f"unknown task {name!r}; known tasks: {', '.join(TASK_NAMES)}")
    cls = classes[name]
    params = inspect.signature(cls).parameters
    allowed = [p for p in params if not p.startswith("_") and p != "name"]
    unknown = sorted(k for k in kwargs if k not in allowed)
    if unknown:
        raise ConfigError(
            f"task {name!r}: unknown option(s) {', '.join(unknown)}; "
            f"options: {', '.join(allowed) or '(none)'}"
        )
    if name == "math" and not kwargs.get("path"):
        raise ConfigError("task 'math' needs a path: a .jsonl, .json or .parquet file of problems")
    return cls(**kwargs)


def build_task(task_cfg: Any) -> Any:
    """The task a config's `task` section names (`cfg.task`), with its data files."""
    if task_cfg.name == "math":
        return get_task("math", path=task_cfg.path, test_path=task_cfg.eval_path)
    if task_cfg.path or task_cfg.eval_path:
        raise ConfigError(f"task.path: only the math task reads a file, not {task_cfg.name!r}")
    return get_task(task_cfg.name)
