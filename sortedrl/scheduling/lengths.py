"""Length history, prediction and update pacing for the `sorted` policy (pure Python).

`LengthHistory` keeps the most recent finished lengths of each prompt, over epochs and over
the siblings of the group in flight, and predicts how long a response runs given how far it
has got: the mean of the prompt's recorded lengths that exceed its progress (lengths are
heavy-tailed, so a response that outlived the short ones is predicted among the long ones).
A prompt with no record borrows the same estimate from every length seen so far.

`plan_wait` is the update-pacing decision (`SchedulerConfig.update_pacing`). Its cost model,
in slot-steps (one engine slot for one decode step; a generated token costs one):

- restarting a group the update pushes past the staleness bound costs the tokens it holds
  (they are discarded and must be generated again);
- waiting W decode steps before the update costs the engine slots left idle meanwhile: as
  the responses running now finish (at their predicted remaining lengths) their slots free,
  and only the work the controller can still hand out (queued responses, and prompts the
  policy may still admit) refills them.

Waiting for the groups predicted to complete first saves their tokens; the plan picks the
wait that saves the most net of its cost, or none when no wait pays for itself. Not counted:
groups that complete during the wait beyond what the update trains wait for later updates,
which then come sooner, and may go stale themselves.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any

# Most recent lengths kept per prompt: enough for a few epochs of a group of 8.
HISTORY_WINDOW = 32


class LengthHistory:
    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._by_prompt: dict[str, deque[int]] = {}
        self._all: deque[int] = deque(maxlen=4096)  # recent lengths of every prompt

    def record(self, prompt_id: str, length: int) -> None:
        hist = self._by_prompt.get(prompt_id)
        if hist is None:
            hist = self._by_prompt[prompt_id] = deque(maxlen=HISTORY_WINDOW)
        hist.append(length)
        self._all.append(length)

    def known(self, prompt_id: str) -> int:
        """How many lengths of this prompt are on record."""
        hist = self._by_prompt.get(prompt_id)
        return len(hist) if hist else 0

    def predict(self, prompt_id: str, progress: float = 0.0) -> float:
        """Predicted total length of a response of this prompt that has `progress` tokens."""
        hist = self._by_prompt.get(prompt_id) or self._all
        longer = [x for x in hist if x > progress]
        if longer:
            return sum(longer) / len(longer)
        if not hist:
            return float(self.cap)  # nothing seen yet: assume the worst
        # Longer than anything on record: assume it runs as long again, up to the cap.
        return min(float(self.cap), max(progress + 1.0, 2.0 * progress))

    def state_dict(self) -> dict[str, Any]:
        return {
            "by_prompt": {p: list(h) for p, h in self._by_prompt.items()},
            "all": list(self._all),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._by_prompt = {
            p: deque((int(x) for x in h), maxlen=HISTORY_WINDOW)
            for p, h in state["by_prompt"].items()
        }
        self._all = deque((int(x) for x in state["all"]), maxlen=self._all.maxlen)


def plan_wait(
    at_risk: Sequence[tuple[float, float]],
    running_remaining: Sequence[float],
    capacity: int,
    refill: int,
    max_groups: int,
) -> tuple[float, int] | None:
    """How long to hold an update back, by the cost model of the module docstring.

    `at_risk`: (predicted decode steps until the group is complete, tokens it holds) for each
    group the update would push past the bound; `running_remaining`: predicted remaining
    steps of every response running now; `refill`: responses that could take a freed slot;
    `max_groups`: how many saved groups the update can train. Returns (steps to wait,
    groups it saves), or None when waiting does not pay.
    """
    if not at_risk or capacity <= 0 or max_groups <= 0:
        return None
    finishes = sorted(running_remaining)
    busy0 = len(finishes)
    best: tuple[float, float, int] | None = None  # (net gain, wait, groups)
    saved = 0.0
    idle_cost, t_prev, k = 0.0, 0.0, 0  # k: running responses finished by t_prev
    for n, (wait, held) in enumerate(sorted(at_risk)[:max_groups], start=1):
        # Idle slot-steps between t_prev and `wait`, piecewise over the finishes.
        while t_prev < wait:
            t_next = finishes[k] if k < len(finishes) and finishes[k] < wait else wait
            idle = max(0, capacity - min(capacity, busy0 - k + refill))
            idle_cost += idle * (t_next - t_prev)
            t_prev = t_next
            while k < len(finishes) and finishes[k] <= t_prev:
                k += 1
        saved += held
        gain = saved - idle_cost
        if gain > 0 and (best is None or gain > best[0]):
            best = (gain, wait, n)
    return None if best is None else (best[1], best[2])
