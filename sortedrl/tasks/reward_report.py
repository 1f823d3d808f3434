"""What your reward functions did over a set of scored responses: each function's mean value,
its failures by kind and its first messages.

A failure is written ``"<kind>: <message>"`` (`Score.parts`), the kind one of
:data:`FAILURE_KINDS`:

* ``raised``: the function raised (the message is the exception's type and text);
* ``wrong_type``: it returned something that is not a number (a string, ``None`` from a
  ``fn(problem, response)``, a dict, ...), or a TRL-style function returned no list;
* ``wrong_length``: a TRL-style function's list does not hold one value per completion;
* ``non_finite``: NaN or an infinity;
* ``timed_out``: the call ran past ``task.reward_timeout_s`` and was cut;
* ``worker_died``: the worker process died during the call (e.g. out of memory).

Metric names (metrics.jsonl, TensorBoard): ``rewards/<fn>/mean`` (as TRL logs it; over the
values the function gave, NaN when it gave none), ``reward_failures/<fn>/<kind>`` and
``reward_failures/<fn>/failed`` (all kinds).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

from sortedrl.tasks.base import Score

FAILURE_KINDS = ("raised", "wrong_type", "wrong_length", "non_finite", "timed_out", "worker_died")
#: Messages kept per function (the console shows these; the counts cover every failure).
MESSAGES_KEPT = 3


def failure_kind(failure: str) -> str:
    return failure.split(":", 1)[0]


class RewardReport:
    """Values and failures per reward function over the Scores given to :meth:`add`."""

    def __init__(self, names: Iterable[str] = ()) -> None:
        self.names: list[str] = list(names)
        self.calls: dict[str, int] = {n: 0 for n in self.names}
        self.failures: dict[str, Counter[str]] = {n: Counter() for n in self.names}
        self.messages: dict[str, list[str]] = {n: [] for n in self.names}
        self._sums: dict[str, float] = {n: 0.0 for n in self.names}
        self._values: dict[str, int] = {n: 0 for n in self.names}

    def add(self, score: Score) -> list[tuple[str, str]]:
        """Count one response's parts; returns the (function, failure) pairs it holds."""
        failed: list[tuple[str, str]] = []
        for name, value, failure in score.parts:
            if name not in self.calls:
                self.names.append(name)
                self.calls[name], self.failures[name], self.messages[name] = 0, Counter(), []
                self._sums[name], self._values[name] = 0.0, 0
            self.calls[name] += 1
            if failure is not None:
                self.failures[name][failure_kind(failure)] += 1
                if len(self.messages[name]) < MESSAGES_KEPT:
                    self.messages[name].append(failure)
                failed.append((name, failure))
            elif value is not None:
                self._sums[name] += value
                self._values[name] += 1
        return failed

    def failed(self, name: str) -> int:
        return sum(self.failures[name].values())

    def failed_every_call(self) -> list[str]:
        """The functions that were called and failed on every call."""
        return [n for n in self.names if self.calls[n] and self.failed(n) == self.calls[n]]

    def mean(self, name: str) -> float:
        return self._sums[name] / self._values[name] if self._values[name] else float("nan")

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for n in self.names:
            out[f"rewards/{n}/mean"] = self.mean(n)
            out[f"reward_failures/{n}/failed"] = self.failed(n)
            for kind in FAILURE_KINDS:
                out[f"reward_failures/{n}/{kind}"] = self.failures[n][kind]
        return out

    def failure_counts(self) -> dict[str, dict[str, int]]:
        """{function: {kind: count}} for the functions that failed at all."""
        return {n: dict(self.failures[n]) for n in self.names if self.failed(n)}


def failure_totals(lines: Iterable[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """{function: {kind: count}} summed over metrics lines, for the functions that failed at
    all (summary.json)."""
    totals: dict[str, Counter[str]] = {}
    for line in lines:
        for key, value in line.items():
            parts = key.split("/")
            if len(parts) == 3 and parts[0] == "reward_failures" and parts[2] in FAILURE_KINDS:
                totals.setdefault(parts[1], Counter())[parts[2]] += int(value)
    return {n: {k: v for k, v in c.items() if v} for n, c in totals.items() if sum(c.values())}


class FailureConsole:
    """Prints the first :data:`MESSAGES_KEPT` failures of each reward function, with its name,
    then one line saying where the rest are counted."""

    def __init__(self, out: Any = None) -> None:
        self.shown: Counter[str] = Counter()
        self.out = out  # a file; None: stdout

    def show(self, score: Score, where: str) -> None:
        for name, _, failure in score.parts:
            if failure is None or self.shown[name] > MESSAGES_KEPT:  # said so already
                continue
            self.shown[name] += 1
            if self.shown[name] <= MESSAGES_KEPT:
                text = f"reward function {name!r} failed ({where}): {failure}"
            else:
                text = (
                    f"reward function {name!r}: further failures are counted, not shown "
                    f"(reward_failures/{name}/<kind> in metrics.jsonl and TensorBoard)"
                )
            print(text, file=self.out, flush=True)
