"""Your own reward functions (`task.reward_fns`, `task.reward_weights`), in either signature.

* sortedrl's: ``fn(problem, response) -> float | Score``, one response at a time, with the
  :class:`~sortedrl.tasks.base.Problem` (``problem.prompt``, ``problem.answer``,
  ``problem.meta["columns"]``).
* TRL's (``GRPOTrainer``): ``fn(completions, **kwargs) -> list[float]``, recognised by a
  parameter named ``completions``. It is called with ``prompts`` (the prompt text the model
  saw, before any chat template), ``completions`` (the decoded responses) and every other
  column of the dataset row as a keyword list, as TRL passes them, e.g. ``answer=[...]``.
  It is called with lists of one element: each response is scored in its own call, so the
  sandbox's time limit applies to each response (:class:`~sortedrl.tasks.rewards.RewardRunner`).
  TRL's ``completion_ids``, ``trainer_state``, ``log_extra`` and ``log_metric`` are not passed;
  a ``None`` in the returned list (TRL: "not applicable to this sample") adds nothing to the sum.

With several functions, a response's reward is ``sum(weight_i * reward_i)``; weights default
to 1. Whether a response is correct (the ``accuracy`` measure) is the task's verifier's verdict
against the reference answer when the problem has one (rewards may give partial credit, so a
positive reward says little); without an answer, every function that returned a
:class:`~sortedrl.tasks.base.Score` must say so, or, if none did, the reward must be > 0.

The wrappers here are module-level and hold the functions by reference, so they pickle into
the reward sandbox's worker processes as long as the functions' modules import there.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

from sortedrl.errors import ConfigError
from sortedrl.tasks.base import Problem, Score

SORTEDRL = "sortedrl"
TRL = "trl"


def signature_style(fn: Callable[..., Any], spec: str) -> str:
    """``"trl"`` for ``fn(completions, **kwargs)``, ``"sortedrl"`` for ``fn(problem, response)``."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin or C callable: assume the positional form
        return SORTEDRL
    if "completions" in params:
        return TRL
    positional = [
        p
        for p in params.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
    ]
    if len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in positional):
        return SORTEDRL
    names = ", ".join(params) or "none"
    raise ConfigError(
        f"task.reward_fns: {spec!r} takes ({names}); expected fn(problem, response) or "
        "TRL's fn(completions, **kwargs)"
    )


class TRLReward:
    """A TRL-style reward function called for one response (see the module docstring)."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def __call__(self, problem: Problem, response: str) -> float | None:
        columns = problem.meta.get("columns", {}) if isinstance(problem.meta, dict) else {}
        kwargs = {k: [v] for k, v in columns.items() if k not in ("prompts", "completions")}
        out = self.fn(prompts=[problem.prompt], completions=[response], **kwargs)
        if isinstance(out, (str, bytes)) or not isinstance(out, Sequence) or len(out) != 1:
            raise TypeError(
                f"a TRL-style reward must return a list with one value per completion, got "
                f"{type(out).__name__}"
                + (f" of length {len(out)}" if hasattr(out, "__len__") else "")
            )
        return out[0]


class WeightedReward:
    """The weighted sum of several reward functions' values as one Score."""

    def __init__(
        self,
        fns: Sequence[Callable[[Problem, str], Any]],
        weights: Sequence[float],
        judge: Any = None,
    ):
        if len(fns) != len(weights):
            raise ConfigError(
                f"task.reward_weights: {len(weights)} weights for {len(fns)} reward functions"
            )
        self.fns = list(fns)
        self.weights = [float(w) for w in weights]
        self.judge = judge  # a task whose score() gives the verdict where there is an answer

    def __call__(self, problem: Problem, response: str) -> Score:
        total = 0.0
        verdicts: list[bool] = []
        format_ok = True
        for fn, w in zip(self.fns, self.weights, strict=True):
            value = fn(problem, response)
            if value is None:
                continue
            if isinstance(value, Score):
                if value.error is not None:
                    return value
                verdicts.append(bool(value.correct))
                format_ok = format_ok and bool(value.format_ok)
                value = value.reward
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"a reward function returned {type(value).__name__}, not a float")
            if not math.isfinite(value):
                raise ValueError(f"a reward function returned {value}")
            total += w * float(value)
        if self.judge is not None and problem.answer:
            correct = bool(self.judge.score(problem, response).correct)
        else:
            correct = all(verdicts) if verdicts else total > 0
        return Score(total, correct, format_ok)

    def warmup(self) -> None:
        warm = getattr(self.judge, "warmup", None)
        if callable(warm):
            warm()


def load_reward_fns(
    specs: Sequence[str], weights: Sequence[float] | None, judge: Any = None
) -> WeightedReward:
    """The functions named ``"package.module:function"``, each in its own signature, weighted;
    `judge` (a task) decides correctness where a problem has a reference answer."""
    if not specs:
        raise ConfigError("task.reward_fns: empty")
    fns: list[Callable[[Problem, str], Any]] = []
    for spec in specs:
        fn = load_reward_fn(spec)
        fns.append(TRLReward(fn) if signature_style(fn, spec) == TRL else fn)
    return WeightedReward(fns, weights if weights is not None else [1.0] * len(fns), judge)


def load_reward_fn(spec: str) -> Callable[[Problem, str], float | Score]:
    """Resolve ``"package.module:function"`` (attribute path after the colon may be dotted)."""
    where = f"task.reward_fns: {spec!r}"
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise ConfigError(f"{where}: expected 'package.module:function'")
    mod_name, attr_path = (s.strip() for s in spec.split(":"))
    if not mod_name or not attr_path:
        raise ConfigError(f"{where}: expected 'package.module:function'")
    try:
        module = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        raise ConfigError(f"{where}: module {e.name!r} not found") from None
    except Exception as e:
        raise ConfigError(
            f"{where}: importing {mod_name!r} failed: {type(e).__name__}: {e}"
        ) from None
    obj: Any = module
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{where}: {mod_name!r} has no attribute {attr_path!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{where}: {attr_path!r} is a {type(obj).__name__}, not a function")
    return obj
