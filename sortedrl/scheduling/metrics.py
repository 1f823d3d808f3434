"""The one place where the run's measures are defined.

Bubble ratio (docs/design.md, measures): over the time the engine is generating, idle slot-time over
total slot-time, `1 - busy_slot_s / (capacity * generating_s)`. It counts work that is later
discarded as busy, so it is always reported beside goodput: trained tokens (and samples) per
second of wall time.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

PHASES = ("rollout", "reward", "update", "weight_sync", "idle")


class OvercountedBusyTime(RuntimeError):
    """An engine reported more busy slot-time than its capacity allows: a bug, not a metric."""


def bubble_ratio(busy_slot_s: float, capacity: int, generating_s: float) -> float:
    """Idle share of the slot-time; an engine that reports more busy slot-time than
    `capacity * generating_s` is an error (never clamped away)."""
    if generating_s <= 0 or capacity <= 0:
        return 0.0
    total = capacity * generating_s
    if busy_slot_s > total * (1 + 1e-9):
        raise OvercountedBusyTime(
            f"busy slot-time {busy_slot_s:.6g} exceeds capacity {capacity} x generating time "
            f"{generating_s:.6g} s: the engine over-counts its running sequences"
        )
    # Only a rounding residue (at most 1e-9 of the total) can make this negative.
    return max(0.0, 1.0 - busy_slot_s / total)


def goodput(trained: float, wall_time_s: float) -> float:
    return trained / wall_time_s if wall_time_s > 0 else 0.0


@dataclass
class UpdateRecord:
    step: int  # 1-based update count
    policy_version: int  # version that was updated (the update produced version + 1)
    groups: int
    samples: int
    tokens: int
    response_len_mean: float
    max_staleness_trained: int
    mean_staleness_trained: float
    time_s: float  # run time when the update finished
    bubble_ratio: float  # over the rollout since the previous update
    reward_mean: float
    skipped: bool = False
    stats: dict[str, float] = field(default_factory=dict)


class Ledger:
    """Counts that must balance:

    prompts admitted = trained + dropped + in flight
    tokens generated = trained + wasted + in flight
    """

    def __init__(self) -> None:
        self.prompts_admitted = 0
        self.prompts_trained = 0
        self.prompts_dropped: Counter[str] = Counter()
        self.samples_trained = 0
        self.tokens_generated = 0
        self.tokens_trained = 0
        self.tokens_wasted: Counter[str] = Counter()
        self.staleness_hist: Counter[int] = Counter()  # staleness -> trained tokens
        self.regenerations = 0  # responses restarted from scratch after their work was discarded
        self.updates: list[UpdateRecord] = []

    def state_dict(self) -> dict[str, Any]:
        return {
            "prompts_admitted": self.prompts_admitted,
            "prompts_trained": self.prompts_trained,
            "prompts_dropped": dict(self.prompts_dropped),
            "samples_trained": self.samples_trained,
            "tokens_generated": self.tokens_generated,
            "tokens_trained": self.tokens_trained,
            "tokens_wasted": dict(self.tokens_wasted),
            "staleness_hist": {str(k): v for k, v in self.staleness_hist.items()},
            "regenerations": self.regenerations,
            "updates": [asdict(u) for u in self.updates],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.prompts_admitted = state["prompts_admitted"]
        self.prompts_trained = state["prompts_trained"]
        self.prompts_dropped = Counter(state["prompts_dropped"])
        self.samples_trained = state["samples_trained"]
        self.tokens_generated = state["tokens_generated"]
        self.tokens_trained = state["tokens_trained"]
        self.tokens_wasted = Counter(state["tokens_wasted"])
        self.staleness_hist = Counter({int(k): v for k, v in state["staleness_hist"].items()})
        self.regenerations = state["regenerations"]
        self.updates = [UpdateRecord(**u) for u in state["updates"]]

    def add_trained_spans(self, version: int, spans: list[tuple[int, int]]) -> None:
        for v, n in spans:
            self.staleness_hist[version - v] += n

    @property
    def max_staleness_trained(self) -> int:
        return max((s for s, n in self.staleness_hist.items() if n), default=0)

    @property
    def mean_staleness_trained(self) -> float:
        total = sum(self.staleness_hist.values())
        return sum(s * n for s, n in self.staleness_hist.items()) / total if total else 0.0


class Clock:
    """Run time, split by phase, plus the engine's busy slot-time while generating."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.t = 0.0
        self.phases: Counter[str] = Counter()  # adds up to `t`
        self.overlapped: Counter[str] = Counter()  # async: trainer time beside the engine's
        self.generating_s = 0.0
        self.busy_slot_s = 0.0
        self._since_update = [0.0, 0.0]  # generating_s, busy_slot_s since the last update
        self.rounds: dict[int, list[float]] = {}  # round -> [generating_s, busy_slot_s]
        self.timeline = Timeline()

    def add(self, phase: str, seconds: float) -> None:
        self.phases[phase] += seconds
        self.t += seconds

    def add_generation(
        self, elapsed_s: float, busy_slot_s: float, advance: bool = True, round_: int = -1
    ) -> None:
        """An engine step, spent on the oldest open `round_`. `advance=False` when the step
        overlapped other work (async)."""
        self.timeline.add(self.t, elapsed_s, busy_slot_s)
        r = self.rounds.setdefault(round_, [0.0, 0.0])
        r[0] += elapsed_s
        r[1] += busy_slot_s
        self.generating_s += elapsed_s
        self.busy_slot_s += busy_slot_s
        self._since_update[0] += elapsed_s
        self._since_update[1] += busy_slot_s
        if advance:
            self.add("rollout", elapsed_s)
        else:
            self.phases["rollout"] += elapsed_s

    def interval_bubble(self) -> float:
        """Bubble ratio since the previous call (one per update)."""
        gen, busy = self._since_update
        self._since_update = [0.0, 0.0]
        return bubble_ratio(busy, self.capacity, gen)

    @property
    def bubble_ratio(self) -> float:
        return bubble_ratio(self.busy_slot_s, self.capacity, self.generating_s)


class Timeline:
    """Engine occupancy over time in at most ~2*max_bins bins (merged as the run grows)."""

    def __init__(self, max_bins: int = 2000) -> None:
        self.max_bins = max_bins
        self.width = 0.0  # 0 until the first step sets a scale
        self.bins: dict[int, list[float]] = {}  # bin -> [elapsed, busy]

    def add(self, t: float, elapsed: float, busy: float) -> None:
        if elapsed <= 0:
            return
        if self.width == 0.0:
            self.width = elapsed
        b = self.bins.setdefault(int(t // self.width), [0.0, 0.0])
        b[0] += elapsed
        b[1] += busy
        if len(self.bins) > 2 * self.max_bins:
            merged: dict[int, list[float]] = {}
            for k, (e, u) in self.bins.items():
                m = merged.setdefault(k // 2, [0.0, 0.0])
                m[0] += e
                m[1] += u
            self.bins = merged
            self.width *= 2

    def series(self) -> tuple[list[float], list[float]]:
        """(bin start times, mean running sequences while generating in that bin)."""
        keys = sorted(self.bins)
        return [k * self.width for k in keys], [self.bins[k][1] / self.bins[k][0] for k in keys]


def summarize(
    ledger: Ledger, clock: Clock, in_flight_prompts: int, in_flight_tokens: int
) -> dict[str, Any]:
    """The run's summary: the keys `sortedrl simulate --json` promises, and more."""
    wall = clock.t
    wasted = sum(ledger.tokens_wasted.values())
    return {
        "bubble_ratio": clock.bubble_ratio,
        "wall_time_s": wall,
        "rollout_time_s": clock.phases["rollout"],
        "reward_time_s": clock.phases["reward"],
        "update_time_s": clock.phases["update"] + clock.overlapped["update"],
        "weight_sync_time_s": clock.phases["weight_sync"],
        "idle_time_s": clock.phases["idle"],
        "generating_time_s": clock.generating_s,
        "tokens_generated": ledger.tokens_generated,
        "tokens_trained": ledger.tokens_trained,
        "tokens_wasted": wasted,
        "tokens_wasted_by_reason": dict(sorted(ledger.tokens_wasted.items())),
        "tokens_in_flight": in_flight_tokens,
        "wasted_token_share": wasted / ledger.tokens_generated if ledger.tokens_generated else 0.0,
        "prompts_admitted": ledger.prompts_admitted,
        "prompts_trained": ledger.prompts_trained,
        "prompts_dropped": sum(ledger.prompts_dropped.values()),
        "prompts_dropped_by_reason": dict(sorted(ledger.prompts_dropped.items())),
        "prompts_in_flight": in_flight_prompts,
        "samples_trained": ledger.samples_trained,
        "regenerations": ledger.regenerations,
        "max_staleness_trained": ledger.max_staleness_trained,
        "mean_staleness_trained": ledger.mean_staleness_trained,
        "staleness_histogram": {str(k): v for k, v in sorted(ledger.staleness_hist.items())},
        "updates": len(ledger.updates),
        "update_response_len_mean": [round(u.response_len_mean, 1) for u in ledger.updates],
        "update_bubble_ratio": [round(u.bubble_ratio, 4) for u in ledger.updates],
        "round_bubble_ratio": [
            round(bubble_ratio(busy, clock.capacity, gen), 4)
            for _, (gen, busy) in sorted(clock.rounds.items())
        ],
        "goodput_tokens_per_s": goodput(ledger.tokens_trained, wall),
        "goodput_samples_per_s": goodput(ledger.samples_trained, wall),
    }
