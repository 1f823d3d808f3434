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
  TRL's ``completion_ids`` (the response's token ids) is passed too; ``trainer_state``,
  ``log_extra`` and ``log_metric`` are not. A ``None`` in the returned list (TRL: "not
  applicable to this sample") adds nothing to the sum. The list may be a numpy array.

Values may be Python or numpy numbers. With several functions, a response's reward is
``sum(weight_i * reward_i)``; weights default to 1. Each function is called on its own (in the
sandbox, each call under its own time limit). A function that fails on a response (raises,
returns something that is not a number, the wrong number of values or a NaN, or runs past the
time limit) adds nothing to that response's sum: the other functions' shares stand, and the
failure is counted for that function by kind (:mod:`sortedrl.tasks.reward_report`). So a
response's reward is the weighted sum over the functions that gave a value.

Whether a response is correct (the ``accuracy`` measure) is the task's verifier's verdict
against the reference answer when the problem has one (rewards may give partial credit, so a
positive reward says little, and a failing function must not decide it); without an answer,
every function that returned a :class:`~sortedrl.tasks.base.Score` must say so, or, if none
did, the reward must be > 0.

The wrappers here are module-level and hold the functions by reference, so they pickle into
the reward sandbox's worker processes as long as the functions' modules import there.
"""

from __future__ import annotations

import importlib
import inspect
import math
import numbers
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sortedrl.errors import ConfigError
from sortedrl.tasks.base import Problem, Score

SORTEDRL = "sortedrl"
TRL = "trl"
MAX_FAILURE_CHARS = 300


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


class RewardFailure(Exception):
    """A reward function's return value is unusable; `kind` is one of `FAILURE_KINDS`."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def reward_value(value: Any, none_ok: bool) -> float | None:
    """A returned value as a float (numpy scalars and 0-d arrays included), or None where
    `none_ok` (TRL's "not applicable"); anything else is a `RewardFailure`."""
    if value is None and none_ok:
        return None
    if getattr(value, "shape", None) == () and callable(getattr(value, "item", None)):
        value = value.item()  # a numpy scalar or 0-d array
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise RewardFailure("wrong_type", f"returned {_describe(value)}, not a float")
    if not math.isfinite(value):
        raise RewardFailure("non_finite", f"returned {float(value)}")
    return float(value)


def _describe(value: Any) -> str:
    if value is None:
        return "None"
    text = repr(value)
    return f"{type(value).__name__} {text[:40]}{'...' if len(text) > 40 else ''}"


class TRLReward:
    """A TRL-style reward function called for one response (see the module docstring)."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def __call__(
        self, problem: Problem, response: str, token_ids: Sequence[int] | None = None
    ) -> Any:
        columns = problem.meta.get("columns", {}) if isinstance(problem.meta, dict) else {}
        reserved = ("prompts", "completions", "completion_ids")
        kwargs = {k: [v] for k, v in columns.items() if k not in reserved}
        if token_ids is not None:
            kwargs["completion_ids"] = [list(token_ids)]
        messages = problem.meta.get("messages") if isinstance(problem.meta, dict) else None
        if messages is not None:  # conversational, as TRL passes it
            prompt: Any = [dict(m) for m in messages]
            completion: Any = [{"role": "assistant", "content": response}]
        else:
            prompt, completion = problem.prompt, response
        out = self.fn(prompts=[prompt], completions=[completion], **kwargs)
        if hasattr(out, "tolist") and getattr(out, "ndim", None) == 1:
            out = out.tolist()  # a numpy array, as TRL accepts it
        if isinstance(out, (str, bytes)) or not isinstance(out, Sequence):
            raise RewardFailure(
                "wrong_type", f"returned {_describe(out)}; a TRL-style reward returns a list"
            )
        if len(out) != 1:
            raise RewardFailure("wrong_length", f"returned {len(out)} values for 1 completion")
        return out[0]


class RewardFunction:
    """One of your functions by name: its value for one response, or its failure, as the
    single part of a Score (see `sortedrl.tasks.reward_report` for the failure kinds)."""

    def __init__(self, fn: Callable[..., Any], name: str, style: str) -> None:
        self.fn, self.name, self.style = fn, name, style

    def score(
        self, problem: Problem, response: str, token_ids: Sequence[int] | None = None
    ) -> Score:
        verdict, format_ok = None, True
        try:
            if self.style == TRL:
                value = TRLReward(self.fn)(problem, response, token_ids)
            else:
                value = self.fn(problem, response)
            if isinstance(value, Score):
                if value.error is not None:
                    raise RewardFailure("raised", f"returned a Score with error {value.error}")
                verdict, format_ok = bool(value.correct), bool(value.format_ok)
                value = value.reward
            reward = reward_value(value, none_ok=self.style == TRL)
        except RewardFailure as e:
            return self._failed(f"{e.kind}: {e}")
        except Exception as e:  # noqa: BLE001 - your code may raise anything
            return self._failed(f"raised: {_exception_text(e)}")
        return FunctionScore(
            reward or 0.0,
            bool(verdict),
            format_ok,
            parts=((self.name, reward, None),),
            verdict=verdict,
        )

    def _failed(self, failure: str) -> Score:
        return Score(0.0, False, False, parts=((self.name, None, failure[:MAX_FAILURE_CHARS]),))


@dataclass(frozen=True)
class FunctionScore(Score):
    """One function's answer; `verdict` is set where it returned a Score of its own."""

    verdict: bool | None = None


def _exception_text(e: BaseException) -> str:
    try:
        text = str(e)
    except Exception:  # noqa: BLE001 - a hostile __str__
        text = ""
    return type(e).__name__ + (f": {text}" if text else "")


class Verdict:
    """The task's verifier as a part of the weighted reward: it decides `correct` where the
    problem has a reference answer (its reward is not added)."""

    def __init__(self, task: Any) -> None:
        self.task = task

    def score(
        self, problem: Problem, response: str, token_ids: Sequence[int] | None = None
    ) -> Score:
        if not problem.answer:
            return Score(0.0, False, True)
        return self.task.score(problem, response)

    def warmup(self) -> None:
        warm = getattr(self.task, "warmup", None)
        if callable(warm):
            warm()


class WeightedReward:
    """The weighted sum of several reward functions' values as one Score.

    The sandbox (`RewardRunner`) calls each of :attr:`parts` on its own, each under its own
    time limit, and :meth:`combine` makes one Score of their answers: a function that failed
    adds nothing to the sum (the others' shares stand) and its failure is in `Score.parts`.
    """

    def __init__(
        self,
        fns: Sequence[RewardFunction],
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
        self.parts: list[Any] = [*self.fns, *([Verdict(judge)] if judge is not None else [])]

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.fns]

    def combine(self, problem: Problem, response: str, answers: Sequence[Score]) -> Score:
        """One Score from the answers of :attr:`parts`, in order (a part the sandbox cut or
        lost has a Score with only `error` set)."""
        total = 0.0
        verdicts: list[bool] = []
        format_ok = True
        parts = []
        for fn, w, s in zip(self.fns, self.weights, answers, strict=False):
            if s.error is not None:  # the sandbox's: a timeout or a dead worker
                kind = {"timeout": "timed_out", "worker_died": "worker_died"}.get(
                    s.error.split(":", 1)[0], "raised"
                )
                parts.append((fn.name, None, f"{kind}: {s.error}"[:MAX_FAILURE_CHARS]))
                continue
            (part,) = s.parts
            parts.append(part)
            if part[2] is not None or part[1] is None:
                continue
            total += w * part[1]
            verdict = getattr(s, "verdict", None)
            if verdict is not None:
                verdicts.append(verdict)
            format_ok = format_ok and bool(s.format_ok)
        if self.judge is not None and problem.answer:
            judged = answers[len(self.fns)]
            correct = judged.error is None and bool(judged.correct)
        else:
            correct = all(verdicts) if verdicts else total > 0
        return Score(total, correct, format_ok, parts=tuple(parts))

    def __call__(
        self, problem: Problem, response: str, token_ids: Sequence[int] | None = None
    ) -> Score:
        """All parts in this process, one after another (no time limit)."""
        answers = [p.score(problem, response, token_ids) for p in self.parts]
        return self.combine(problem, response, answers)

    def warmup(self) -> None:
        for part in self.parts:
            warm = getattr(part, "warmup", None)
            if callable(warm):
                warm()


def reward_fn_names(specs: Sequence[str]) -> list[str]:
    """Each function's name in metrics (``rewards/<name>/mean``): the function's own name, as
    TRL logs it, or the whole spec where two specs end in the same name."""
    short = [str(s).rsplit(":", 1)[-1].strip() for s in specs]
    return [n if short.count(n) == 1 else str(s) for n, s in zip(short, specs, strict=True)]


def load_reward_fns(
    specs: Sequence[str], weights: Sequence[float] | None, judge: Any = None
) -> WeightedReward:
    """The functions named ``"package.module:function"``, each in its own signature, weighted;
    `judge` (a task) decides correctness where a problem has a reference answer."""
    if not specs:
        raise ConfigError("task.reward_fns: empty")
    fns = [
        RewardFunction(fn, name, signature_style(fn, spec))
        for spec, name in zip(specs, reward_fn_names(specs), strict=True)
        for fn in [load_reward_fn(spec)]
    ]
    return WeightedReward(fns, weights if weights is not None else [1.0] * len(fns), judge)


def load_reward_fn(spec: str) -> Callable[[Problem, str], float | Score]:
    """Resolve ``"package.module:function"`` (attribute path after the colon may be dotted)."""
    where = f"task.reward_fns: {spec!r}"
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise ConfigError(f"{where}: expected 'package.module:function'")
    mod_name, attr_path = (s.strip() for s in spec.split(":"))
    if not mod_name or not attr_path:
        raise ConfigError(f"{where}: expected 'package.module:function'")
    # As `python -m` has it: a module in the current directory imports, here and in the
    # sandbox's workers (spawned processes start with this process's sys.path).
    cwd = os.getcwd()
    if not any(p in ("", cwd) for p in sys.path):
        sys.path.append(cwd)
    try:
        module = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        raise ConfigError(
            f"{where}: module {e.name!r} not found (in the current directory {cwd} or on "
            "sys.path); put the folder that holds it on PYTHONPATH"
        ) from None
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
