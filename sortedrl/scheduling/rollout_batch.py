"""The window-fit rule: `sorted` picks its own rollout batch (`rollout_batch: auto`).

R, the prompts `sorted` keeps open, was the one setting a user had to guess. Too few and the
engine idles once a group's short responses have finished and only its long ones run; too
many and updates come so fast that long groups outrun the staleness window, so updates wait
for them (update pacing) or their work is discarded and done again. The best R depends on the
lengths, so the rule estimates, from the lengths it has seen, how many decode steps an update
costs at each R and keeps the cheapest: every update trains U groups, so fewer steps per update
is more trained tokens per step.

The model (fill admission, steady state, in decode steps; a running response gains one token
per step):

- A group of G responses with lengths l_1..l_G completes after M = max l_i steps and holds
  S = sum l_i tokens; then it waits for the next update, half an interval T on average. With R
  groups open and U trained per update, Little's law (open groups = throughput x time open,
  throughput U / T) gives R = (U / T) (E[M] + T / 2), so T = U E[M] / (R - U / 2), and the
  engine runs (R - U / 2) E[S] / E[M] responses at once. It cannot run more than its capacity
  C, so T is at least U E[S] / C.
- A group must be trained within `max_staleness` K intervals of its first token's; started
  half-way through an interval on average, it has (K + 1/2) T steps. A group longer than that
  holds an update back by its overrun (update pacing waits for it; without pacing its restart
  costs more). An update waits for the longest overrun among its U groups: the (1 - 1/U)
  quantile of max(0, M - (K + 1/2) T).
- Steps per update = T + that wait. A larger R shortens T (less bubble) but lengthens the
  wait; the rule evaluates R = U (1 + j/4), j = 0, 1, ... up to the first R that fills the
  engine, and keeps the fewest steps (the smaller R on a tie: fresher tokens).

Why this is a window fit: while the update's longest group M_q overruns, steps per update are
T + M_q - (K + 1/2) T = M_q - (K - 1/2) T, which for K >= 1 falls as T grows. So the cheapest R
is the one whose window (K + 1/2) T just holds M_q (or the R that fills the engine, if that
comes first). With K = 0 (`cache=drop`) an overrun always costs the long group's whole length
and a larger R still shortens T, so the rule fills the engine.

T is not calibrated on the measured update intervals: an interval measured at R includes the
waits and restarts that R caused, so a calibrated T grew with the rule's own waste and R with it
(on a bimodal workload at `max_staleness` 1 it climbed to 4.5U, discarding 34% to 39%). The rule is a function
of the lengths and the engine's capacity alone.

The lengths are those of completed groups (siblings together). Groups complete short first, so
the groups completed so far are a biased sample until every group admitted before them has
completed too: the rule uses only that unbiased prefix of admission order, its most recent
8 U groups (eight updates' worth, so the estimate follows lengths that drift as the policy
learns), and decides once it holds U groups. Until then it runs R0 = U / 2 + C / G, the R that
fills the engine by the model when every response runs as long as its group's longest.

Everything is a function of what the controller observed (completed lengths, the engine's
capacity), so a run is deterministic for a seed; the state goes into the controller checkpoint.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# Candidate rollout batches are U (1 + j / GRID), j = 0, 1, ...: a quarter of an update batch
# is finer than the goodput differences the model can resolve.
GRID = 4
# Groups the length estimate rests on, in update batches.
WINDOW_UPDATES = 8


class WindowFitRule:
    """The rollout batch of a `sorted` run with `rollout_batch: auto` (module docstring)."""

    name = "window-fit"

    def __init__(self, update_batch: int, group_size: int, staleness_limit: int) -> None:
        self.update_batch = update_batch
        self.group_size = group_size
        self.staleness_limit = staleness_limit
        self.capacity: int | None = None  # engine slots, known from the first submission
        self.rollout_batch: int | None = None  # the current R; None until capacity is known
        # admission order -> sibling lengths, for completed groups not yet in the prefix
        self._pending: dict[int, list[int]] = {}
        self._prefix: deque[list[int]] = deque(maxlen=WINDOW_UPDATES * update_batch)
        self._next_order = 0  # the admission order the unbiased prefix has reached

    # --- observations -----------------------------------------------------------------------
    def set_capacity(self, capacity: int) -> None:
        """The engine's slots; the first time, the rule starts at R0."""
        self.capacity = max(1, capacity)
        if self.rollout_batch is None:
            u, g = self.update_batch, self.group_size
            self.rollout_batch = max(u, round(u / 2 + self.capacity / g))

    def group_completed(self, order: int, lengths: list[int]) -> None:
        """A group's responses have all finished, with these lengths."""
        if order >= self._next_order:
            self._pending[order] = list(lengths)

    def admitted_through(self, oldest_active: int) -> None:
        """Every group admitted before `oldest_active` has completed: their lengths join the
        unbiased prefix."""
        while self._next_order < oldest_active:
            lengths = self._pending.pop(self._next_order, None)
            if lengths is not None:
                self._prefix.append(lengths)
            self._next_order += 1

    # --- the decision -----------------------------------------------------------------------
    def decide(self) -> int:
        """Re-estimate R (module docstring); returns the current R."""
        assert self.capacity is not None and self.rollout_batch is not None, "nothing submitted"
        if len(self._prefix) >= self.update_batch:
            self.rollout_batch = best_rollout_batch(
                list(self._prefix),
                update_batch=self.update_batch,
                capacity=self.capacity,
                staleness_limit=self.staleness_limit,
            )
        return self.rollout_batch

    # --- checkpoint -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "rule": self.name,
            "capacity": self.capacity,
            "rollout_batch": self.rollout_batch,
            "pending": [[o, ls] for o, ls in sorted(self._pending.items())],
            "prefix": [list(ls) for ls in self._prefix],
            "next_order": self._next_order,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("rule") != self.name:
            raise ValueError(f"rollout batch rule {state.get('rule')!r} is not {self.name!r}")
        self.capacity = state["capacity"]
        self.rollout_batch = state["rollout_batch"]
        self._pending = {int(o): [int(x) for x in ls] for o, ls in state["pending"]}
        self._prefix.clear()
        self._prefix.extend([int(x) for x in ls] for ls in state["prefix"])
        self._next_order = int(state["next_order"])


@dataclass(frozen=True)
class Prediction:
    """What the model predicts at one R, in decode steps (module docstring)."""

    rollout_batch: int
    running: float  # responses the engine runs at once, at most its capacity
    interval: float  # T: steps between updates, without waits
    wait: float  # the update's wait for its longest group past the staleness window

    @property
    def steps_per_update(self) -> float:
        return self.interval + self.wait


def predict(
    groups: Sequence[Sequence[int]],
    rollout_batch: int,
    *,
    update_batch: int,
    capacity: int,
    staleness_limit: int,
) -> Prediction:
    """The model of the module docstring at this R, from these groups' sibling lengths."""
    u, n = update_batch, len(groups)
    longest = [max(ls) for ls in groups]
    mean_max = sum(longest) / n
    mean_sum = sum(sum(ls) for ls in groups) / n
    active = max(rollout_batch - u / 2, 0.5)  # R - U/2 (at least half a group)
    interval = max(u * mean_max / active, u * mean_sum / capacity)
    window = (staleness_limit + 0.5) * interval
    over = sorted(max(0.0, m - window) for m in longest)
    wait = over[min(n - 1, int(n * (1 - 1 / u)))]
    running = min(float(capacity), active * mean_sum / mean_max)
    return Prediction(rollout_batch, running, interval, wait)


def best_rollout_batch(
    groups: Sequence[Sequence[int]],
    *,
    update_batch: int,
    capacity: int,
    staleness_limit: int,
) -> int:
    """The R with the fewest predicted decode steps per update, from U up to the R that
    fills the engine (the smallest R on a tie: fewer prompts in flight)."""
    return min(
        candidates(
            groups,
            update_batch=update_batch,
            capacity=capacity,
            staleness_limit=staleness_limit,
        ),
        key=lambda p: (p.steps_per_update, p.rollout_batch),
    ).rollout_batch


def candidates(
    groups: Sequence[Sequence[int]],
    *,
    update_batch: int,
    capacity: int,
    staleness_limit: int,
) -> list[Prediction]:
    """The prediction at each candidate R: U (1 + j / GRID) for j = 0, 1, ... up to the
    first R whose running responses fill the engine (a larger R only adds queue)."""
    u, out, j = update_batch, [], 0
    while True:
        r = max(u, round(u * (1 + j / GRID)))
        p = predict(
            groups,
            r,
            update_batch=u,
            capacity=capacity,
            staleness_limit=staleness_limit,
        )
        out.append(p)
        if p.running >= capacity:
            return out
        j += 1
