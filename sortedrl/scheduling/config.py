"""Scheduler settings, with the names DESIGN.md uses (group_size, rollout_batch, ...)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

PolicyName = Literal["sync", "sorted", "partial", "async"]
POLICIES: tuple[str, ...] = ("sync", "sorted", "partial", "async")


class SchedulerConfig(BaseModel):
    """How the controller schedules rollout and updates."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    policy: PolicyName = Field("sorted", description="sync | sorted | partial | async")
    group_size: int = Field(8, ge=1, description="responses per prompt (G)")
    rollout_batch: int = Field(
        128, ge=1, description="prompts kept in flight (R); sync uses update_batch instead"
    )
    update_batch: int = Field(32, ge=1, description="complete groups per policy update (U)")
    cache: Literal["drop", "keep"] = Field(
        "keep",
        description="sorted: after an update, drop partial responses (regenerate on-policy) "
        "or keep them (resume under the new policy, bounded by max_staleness)",
    )
    max_staleness: int = Field(
        1, ge=0, description="most policy versions a trained token may lag (keep, async)"
    )
    max_regenerations: int = Field(
        2,
        ge=0,
        description="times a prompt's work may be discarded before it is protected: updates "
        "then wait for its group, so long prompts cannot starve",
    )
    filter_equal_rewards: bool = Field(
        False,
        description="drop complete groups whose rewards are all equal (no advantage signal) "
        "and admit more prompts in their place (DAPO's dynamic sampling)",
    )
    admission: Literal["auto", "round", "fill"] = Field(
        "auto",
        description="sorted: admit a whole round when the previous one is consumed (round), or "
        "keep the engine full by admitting as slots free up, at most rollout_batch open (fill); "
        "auto: round with cache=drop, fill with cache=keep (what measured best, see README)",
    )
    max_new_tokens: int = Field(16384, ge=1, description="response length cap")
    # --- length-aware scheduling (issue #10); off by default ----------------------------------
    submit_order: Literal["fifo", "longest_predicted"] = Field(
        "fifo",
        description="order of the controller's queue within each priority class (protected, "
        "resumed, fresh): in admission order (fifo), or the longest predicted remaining "
        "length first, predicted from the prompt's length history (longest_predicted)",
    )
    update_pacing: bool = Field(
        False,
        description="sorted: hold an update back while groups it would push past the staleness "
        "limit are predicted to complete soon, when the idle engine slots of the wait cost less "
        "than the tokens restarting them would discard (cost model in scheduling/lengths.py)",
    )

    @model_validator(mode="after")
    def _check(self) -> SchedulerConfig:
        if self.policy != "sync" and self.update_batch > self.rollout_batch:
            raise ValueError(
                f"update_batch ({self.update_batch}) must not exceed rollout_batch "
                f"({self.rollout_batch}): an update needs that many complete groups in flight"
            )
        if self.update_pacing and self.policy != "sorted":
            raise ValueError(
                f"update_pacing applies to policy 'sorted' only (policy is '{self.policy}')"
            )
        return self

    @property
    def uses_length_history(self) -> bool:
        """Whether the controller keeps a per-prompt length history."""
        return self.submit_order != "fifo" or self.update_pacing

    @property
    def staleness_limit(self) -> int | None:
        """Most versions a token may lag at training time; None means unbounded."""
        if self.policy == "sync":
            return 0
        if self.policy == "sorted":
            return 0 if self.cache == "drop" else self.max_staleness
        if self.policy == "partial":
            return None  # Kimi k1.5 / APRIL carry partials over without a bound
        return self.max_staleness  # async

    @property
    def effective_admission(self) -> str:
        if self.admission != "auto":
            return self.admission
        return "round" if self.cache == "drop" else "fill"

    @property
    def effective_rollout_batch(self) -> int:
        return self.update_batch if self.policy == "sync" else self.rollout_batch
