"""The simulated engine's records: a request inside it, and one data-parallel replica.

A replica's state is exact at its step boundaries; `marks_s`/`marks_v` record from which step
on each policy version ran, so a finished sequence's version spans follow from its first and
last step. See `sortedrl.engines.simulated` for the model.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable

from sortedrl.scheduling.protocol import FinishReason, VersionSpans

WAITING, RUNNING, DONE = 0, 1, 2
EPS = 1e-9  # seconds: float slack when comparing a replica's clock with the engine's


class SimSeq:
    """One request inside the simulated engine."""

    __slots__ = (
        "rid",
        "prompt_len",
        "final",
        "reason",
        "prefix",
        "spans",
        "state",
        "rep",
        "start",
        "order",
    )

    def __init__(self, rid: str, prompt_len: int, final: int, reason: FinishReason):
        self.rid = rid
        self.prompt_len = prompt_len
        self.final = final  # total response length it will reach
        self.reason: FinishReason = reason
        self.prefix = 0  # tokens generated before the current run (resumed or preempted)
        self.spans: VersionSpans = []  # version spans of those prefix tokens
        self.state = WAITING
        self.rep: Replica | None = None
        self.start = 0  # replica step index at which the current run started
        self.order = -1  # admission number of the current run (validates heap entries)


class Replica:
    """One data-parallel replica: its clock, running sequences and version marks."""

    __slots__ = (
        "idx",
        "t",
        "s",
        "n",
        "kv",
        "pre",
        "heap",
        "stack",
        "marks_s",
        "marks_v",
        "wake",
        "ev",
        "ev_step",
        "dirty",
        "decode",
        "busy_slot_s",
    )

    def __init__(self, idx: int, version: int, decode: Callable[[int, int, int], float]):
        self.idx = idx
        self.t = 0.0  # time of the step boundary the state below describes
        self.s = 0  # decode steps completed at that boundary
        self.n = 0  # running sequences
        self.kv = 0  # KV tokens held by them
        self.pre = 0.0  # prefill time added to the next step
        self.heap: list[tuple[int, int, SimSeq]] = []  # (finish step, order, seq)
        self.stack: list[tuple[int, SimSeq]] = []  # running in admission order, for preemption
        # Policy version of step j is marks_v[i] for the last marks_s[i] < j.
        self.marks_s: list[int] = [-1]
        self.marks_v: list[int] = [version]
        self.wake: int | None = None  # step boundary at which to take queued requests
        self.ev = 0  # id of the valid event in the engine heap
        self.ev_step = 0
        self.dirty = False  # state changed since its event was computed
        self.decode = decode  # CostModel.decode_steps_time(running, kv, steps)
        # Sequence-seconds run on this replica (its share of the engine's busy_slot_s; its
        # bubble is 1 - busy / (max_num_seqs * generating time)), credited at step
        # boundaries; the step in progress at an abort counts in full.
        self.busy_slot_s = 0.0

    def mark(self, m: int, version: int) -> None:
        """Steps after boundary `m` run `version`."""
        ms, mv = self.marks_s, self.marks_v
        # Marks at or past m govern steps that have not run: the new mark replaces them.
        while len(ms) > 1 and ms[-1] >= m:
            ms.pop()
            mv.pop()
        if mv[-1] != version:
            ms.append(m)
            mv.append(version)

    def run_spans(self, a: int, b: int, spans: VersionSpans) -> None:
        """Append the versions of steps a+1..b to `spans`."""
        ms, mv = self.marks_s, self.marks_v
        if ms[-1] <= a:  # no weight update during the run: the common case
            add_span(spans, mv[-1], b - a)
            return
        i = bisect_right(ms, a) - 1
        pos = a
        while pos < b:
            end = min(b, ms[i + 1]) if i + 1 < len(ms) else b
            add_span(spans, mv[i], end - pos)
            pos = end
            i += 1

    def steps_time(self, k: int) -> float:
        """Time of the next `k` steps from the boundary `t` (prefill included)."""
        return self.pre + self.decode(self.n, self.kv, k) if k > 0 else 0.0

    def ceil_steps(self, now: float) -> int:
        """Fewest steps that take this mid-step replica to a boundary at or after `now`."""
        target = now - EPS - self.t
        lo, hi = 1, max(1, self.ev_step - self.s)
        while lo < hi:
            mid = (lo + hi) // 2
            if self.steps_time(mid) >= target:
                hi = mid
            else:
                lo = mid + 1
        return lo

    def floor_steps(self, now: float) -> int:
        """Most steps completed by `now`."""
        target = now + EPS - self.t
        lo, hi = 0, max(0, self.ev_step - self.s)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.steps_time(mid) <= target:
                lo = mid
            else:
                hi = mid - 1
        return lo


def add_span(spans: VersionSpans, version: int, n: int) -> None:
    if n <= 0:
        return
    if spans and spans[-1][0] == version:
        spans[-1] = (version, spans[-1][1] + n)
    else:
        spans.append((version, n))
