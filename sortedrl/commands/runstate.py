"""The run's own position, saved in every checkpoint as `run.json`: a typed record.

What the controller, the trainer and the model hold is saved by them; this is the rest: the
metrics lines written, evaluations, the scores of responses not yet trained, the wall time and
the run loop's clock totals of the segments before this one (a resumed run adds its own).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sortedrl.errors import format_validation_error
from sortedrl.scheduling.metrics import Clock, bubble_ratio, goodput

#: (prompt_id, sample_index, reward, correct, format_ok), then `Score.parts` where there are
#: any (your reward functions' values and failures)
ScoreRow = (
    tuple[str, int, float, bool, bool]
    | tuple[str, int, float, bool, bool, list[tuple[str, float | None, str | None]]]
)


class ClockTotals(BaseModel):
    """The run loop's clock summed over finished segments (see `metrics.Clock`)."""

    model_config = ConfigDict(extra="forbid")
    t: float = 0.0
    phases: dict[str, float] = Field(default_factory=dict)
    overlapped: dict[str, float] = Field(default_factory=dict)
    generating_s: float = 0.0
    busy_slot_s: float = 0.0
    rounds: dict[int, tuple[float, float]] = Field(default_factory=dict)

    def plus(self, clock: Clock) -> ClockTotals:
        """These totals with a live segment's clock added."""
        rounds = dict(self.rounds)
        for r, (gen, busy) in clock.rounds.items():
            old = rounds.get(r, (0.0, 0.0))
            rounds[r] = (old[0] + gen, old[1] + busy)
        return ClockTotals(
            t=self.t + clock.t,
            phases=_add(self.phases, clock.phases),
            overlapped=_add(self.overlapped, clock.overlapped),
            generating_s=self.generating_s + clock.generating_s,
            busy_slot_s=self.busy_slot_s + clock.busy_slot_s,
            rounds=rounds,
        )

    def summary_times(self, capacity: int, tokens: int, samples: int) -> dict[str, Any]:
        """The time fields of `metrics.summarize`, over every segment so far."""
        p, o = self.phases, self.overlapped
        return {
            "bubble_ratio": bubble_ratio(self.busy_slot_s, capacity, self.generating_s),
            "wall_time_s": self.t,
            "rollout_time_s": p.get("rollout", 0.0),
            "reward_time_s": p.get("reward", 0.0),
            "update_time_s": p.get("update", 0.0) + o.get("update", 0.0),
            "weight_sync_time_s": p.get("weight_sync", 0.0),
            "idle_time_s": p.get("idle", 0.0),
            "generating_time_s": self.generating_s,
            "round_bubble_ratio": [
                round(bubble_ratio(busy, capacity, gen), 4)
                for _, (gen, busy) in sorted(self.rounds.items())
            ],
            "goodput_tokens_per_s": goodput(tokens, self.t),
            "goodput_samples_per_s": goodput(samples, self.t),
        }


def _add(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    out = dict(a)
    for k, v in b.items():
        out[k] = out.get(k, 0.0) + v
    return out


class RunState(BaseModel):
    """Everything of the run's position that no other object saves."""

    model_config = ConfigDict(extra="forbid")
    settings: dict[str, Any] = Field(description="the settings a resumed run must share")
    eval_before: dict[str, Any] | None = None
    evals: list[dict[str, Any]] = Field(default_factory=list)
    history: list[dict[str, Any]] = Field(
        default_factory=list, description="the metrics.jsonl lines written so far"
    )
    samples_trained: int = 0
    trace_lines: int = 0
    elapsed_s: float = Field(0.0, description="wall time of the run up to the checkpoint")
    scores: list[ScoreRow] = Field(
        default_factory=list, description="scores of finished responses not yet trained"
    )
    clock: ClockTotals = Field(default_factory=ClockTotals)
    reward_fail_streak: dict[str, int] = Field(
        default_factory=dict,
        description="updates in a row on which each reward function failed on every call",
    )

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="python")  # json.dump writes NaN as the old logs did

    @classmethod
    def from_json(cls, doc: Any, where: str) -> RunState:
        """Read `run.json`; a malformed one is a ValueError naming `where` and the field."""
        try:
            return cls.model_validate(doc)
        except ValidationError as e:
            raise ValueError(f"{where}: {format_validation_error(e)}") from None
