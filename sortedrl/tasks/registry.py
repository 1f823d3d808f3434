"""Tasks by name: `get_task("reverse")`, `get_task("math", path="train.jsonl")`, and the task a
`task` config section describes: `build_task(task_cfg)`.

One entry in `TASKS` adds a task: the `task.name` choices and the rule that a task reading
files needs `task.path` are derived from it. Importing this module imports no task.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Any

from sortedrl.errors import ConfigError


@dataclass(frozen=True)
class TaskEntry:
    cls: str  # "module:Class"
    reads_files: bool = False  # takes `task.path` (and the other file settings)
    # Its verifier runs sympy (math-verify) on model output, so it scores in worker processes
    # under a hard time limit unless `task.reward_workers` says otherwise.
    sandboxed: bool = False


TASKS: dict[str, TaskEntry] = {
    "reverse": TaskEntry("sortedrl.tasks.reverse:ReverseTask"),
    "countdown": TaskEntry("sortedrl.tasks.countdown:SyntheticTask"),
    "knights_knaves": TaskEntry("sortedrl.tasks.knights_knaves:KnightsKnavesTask"),
    "math": TaskEntry("sortedrl.tasks.math:MathTask", reads_files=True, sandboxed=True),
    "dataset": TaskEntry("sortedrl.tasks.dataset:DatasetTask", reads_files=True, sandboxed=True),
}

TASK_NAMES = tuple(TASKS)


def _task_class(name: str) -> type:
    module, cls = TASKS[name].cls.split(":")
    return getattr(importlib.import_module(module), cls)


def get_task(name: str, **kwargs: Any) -> Any:
    """A task object by name; keyword arguments go to its constructor."""
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; known tasks: {', '.join(TASK_NAMES)}")
    cls = _task_class(name)
    params = inspect.signature(cls).parameters
    allowed = [p for p in params if not p.startswith("_") and p != "name"]
    unknown = sorted(k for k in kwargs if k not in allowed)
    if unknown:
        raise ConfigError(
            f"task {name!r}: unknown option(s) {', '.join(unknown)}; "
            f"options: {', '.join(allowed) or '(none)'}"
        )
    if TASKS[name].reads_files and not kwargs.get("path"):
        raise ConfigError(
            f"task {name!r} needs a path: a .jsonl, .json or .parquet file of problems, or a "
            "directory saved with datasets"
        )
    return cls(**kwargs)


def build_task(task_cfg: Any) -> Any:
    """The task of a `task` config section (`sortedrl.tasks.config.TaskConfig`)."""
    t = task_cfg
    if not TASKS[t.name].reads_files:
        return get_task(t.name)
    kwargs: dict[str, Any] = {
        "path": t.path,
        "eval_path": t.eval_path,
        "prompt_key": t.prompt_key,
        "answer_key": t.answer_key,
        # Your own reward functions may need no reference answer; the task's verifier does.
        "answer_required": not t.reward_fns,
    }
    if t.prompt_template is not None:
        kwargs["prompt_template"] = t.prompt_template
    return get_task(t.name, **kwargs)
