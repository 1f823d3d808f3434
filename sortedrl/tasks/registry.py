"""Tasks by name: `get_task("reverse")`, `get_task("math", path="train.jsonl")`, and the task a
`task` config section describes: `build_task(task_cfg)`."""

from __future__ import annotations

import inspect
from typing import Any

from sortedrl.errors import ConfigError


def _task_classes() -> dict[str, type]:
    from sortedrl.tasks.countdown import SyntheticTask
    from sortedrl.tasks.dataset import DatasetTask
    from sortedrl.tasks.knights_knaves import KnightsKnavesTask
    from sortedrl.tasks.math import MathTask
    from sortedrl.tasks.reverse import ReverseTask

    return {
        "reverse": ReverseTask,
        "countdown": SyntheticTask,
        "knights_knaves": KnightsKnavesTask,
        "math": MathTask,
        "dataset": DatasetTask,
    }


TASK_NAMES = ("reverse", "countdown", "knights_knaves", "math", "dataset")


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
    if name in ("math", "dataset") and not kwargs.get("path"):
        raise ConfigError(
            f"task {name!r} needs a path: a .jsonl, .json or .parquet file of problems, or a "
            "directory saved with datasets"
        )
    return cls(**kwargs)


def build_task(task_cfg: Any) -> Any:
    """The task of a `task` config section (`sortedrl.config.TaskSection`)."""
    t = task_cfg
    if t.name not in ("math", "dataset"):
        return get_task(t.name)
    kwargs: dict[str, Any] = {
        "path": t.path,
        "test_path": t.eval_path,
        "prompt_key": t.prompt_key,
        "answer_key": t.answer_key,
        # Your own reward functions may need no reference answer; the task's verifier does.
        "answer_required": not t.reward_fns,
    }
    if t.prompt_template is not None:
        kwargs["prompt_template"] = t.prompt_template
    return get_task(t.name, **kwargs)
