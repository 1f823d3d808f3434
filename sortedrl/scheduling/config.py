"""Scheduler settings: the one declaration of each, in the vocabulary of docs/design.md.

`sortedrl train` embeds `SchedulerConfig` as its `scheduler` section and `sortedrl simulate`
builds its options from these fields, so a setting has one name, one description and one
default everywhere. The defaults are those of the embedded `sortedrl train` run (a 64-sequence
engine on a CPU); a study at another scale says its values (docs/simulate.md spells out the
paper's). Each default's reason is given beside it.

A setting the chosen policy does not read is an error when it is set explicitly (see
`IGNORED_BY`), so an option never does nothing in silence.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

PolicyName = Literal["sync", "sorted", "partial", "async"]
POLICIES: tuple[str, ...] = ("sync", "sorted", "partial", "async")

# Settings each policy never reads, and why. `sorted` with cache=drop ignores max_staleness too.
IGNORED_BY: dict[str, dict[str, str]] = {
    "sync": {
        "rollout_batch": "sync admits update_batch prompts and waits for all of them",
        "cache": "sync never holds work across an update",
        "max_staleness": "sync never trains stale work",
        "max_regenerations": "sync never discards work",
        "admission": "sync admits update_batch prompts and waits for all of them",
        "update_pacing": "sync trains only after every admitted group is complete",
    },
    "sorted": {},
    "partial": {
        "cache": "partial resumes every partial response",
        "max_staleness": "partial does not bound staleness",
        "max_regenerations": "partial never discards work",
        "admission": "partial keeps rollout_batch prompts open",
        "update_pacing": "partial discards nothing, so holding an update back saves nothing",
    },
    "async": {
        "cache": "async bounds staleness with max_staleness",
        "admission": "async admits within its staleness window",
        "update_pacing": "pacing plans for sorted's rounds only",
    },
}


# The rollout batch that partial and async use under `rollout_batch: auto`: the fixed default
# every policy had before sorted adapted its own (four update batches of the embedded run).
FIXED_ROLLOUT_BATCH = 32


def ignored_settings(policy: str, cache: str) -> dict[str, str]:
    """Settings `policy` (with this `cache`) does not read -> why."""
    ignored = dict(IGNORED_BY[policy])
    if policy == "sorted" and cache == "drop":
        ignored["max_staleness"] = "sorted with cache=drop trains on-policy tokens only"
    return ignored


class SchedulerConfig(BaseModel):
    """How the controller schedules rollout and updates."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Default: the method this project implements.
    policy: PolicyName = Field("sorted", description="sync | sorted | partial | async")
    # Default: the usual GRPO group; 8 samples give the group-mean baseline enough to go on.
    group_size: int = Field(8, ge=1, description="responses per prompt (G)")
    # Default: auto, because the best R depends on the lengths (it moved goodput by 14% and the
    # discarded share from 38% to 11% on one workload): sorted picks it by the window-fit rule
    # (scheduling/rollout_batch.py). partial and async keep the fixed value they had.
    rollout_batch: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto",
        description="prompts kept in flight (R); auto: sorted picks and adapts it while it runs "
        f"(the window-fit rule), partial and async use {FIXED_ROLLOUT_BATCH}; sync uses "
        "update_batch instead",
    )
    # Default: a quarter of the rollout batch, so updates come often and train short groups first.
    update_batch: int = Field(8, ge=1, description="complete groups per policy update (U)")
    # Default: keep measured the best goodput at a bounded staleness (docs/simulate.md).
    cache: Literal["drop", "keep"] = Field(
        "keep",
        description="sorted: after an update, drop partial responses (regenerate on-policy) "
        "or keep them (resume under the new policy, bounded by max_staleness)",
    )
    # Default: 2 discarded about half as much work as 1 in the simulator and in real runs.
    max_staleness: int = Field(
        2, ge=0, description="most policy versions a trained token may lag (sorted/keep, async)"
    )
    # Default: a response restarted a third time is at risk of never finishing in time.
    max_regenerations: int = Field(
        2,
        ge=0,
        description="times a prompt's work may be discarded before it is protected: updates "
        "then wait for its group, so long prompts cannot starve",
    )
    # Default: off, so every admitted prompt is trained, as in the paper.
    filter_equal_rewards: bool = Field(
        False,
        description="drop complete groups whose rewards are all equal (no advantage signal) "
        "and admit more prompts in their place (DAPO's dynamic sampling)",
    )
    # Default: auto picks what measured best for each cache setting.
    admission: Literal["auto", "round", "fill"] = Field(
        "auto",
        description="sorted: admit a whole round when the previous one is consumed (round), or "
        "keep the engine full by admitting as slots free up, at most rollout_batch open (fill); "
        "auto: round with cache=drop, fill with cache=keep (what measured best, see docs/simulate.md)",
    )
    # Default: the default task's answers (at most 40 letters, a token each) fit with room.
    max_new_tokens: int = Field(64, ge=1, description="response length cap, in tokens")
    # --- length-aware scheduling (scheduling/lengths.py) ---------------------------------------
    # Default: fifo, the order of the paper (and of every run before these settings existed).
    submit_order: Literal["fifo", "longest_predicted"] = Field(
        "fifo",
        description="order of the controller's queue within each priority class (protected, "
        "resumed, fresh): in admission order (fifo), or the longest predicted remaining "
        "length first, predicted from the prompt's length history (longest_predicted)",
    )
    # Default: on for sorted (off for the policies that do not read it); at max_staleness 2 it
    # measured the best goodput and least waste on all three workload families (docs/simulate.md).
    update_pacing: bool = Field(
        True,
        description="sorted: hold an update back while groups it would push past the staleness "
        "limit are predicted to complete soon, when the idle engine slots of the wait cost less "
        "than the tokens restarting them would discard (cost model in scheduling/lengths.py)",
    )

    @model_validator(mode="after")
    def _check(self) -> SchedulerConfig:
        ignored = ignored_settings(self.policy, self.cache)
        for name in sorted(self.model_fields_set & ignored.keys()):
            raise ValueError(
                f"{name} is set, but policy {self.policy}"
                f"{' with cache=drop' if self.policy == 'sorted' else ''} ignores it "
                f"({ignored[name]}); remove it"
            )
        if self.rollout_batch == "auto" and "rollout_batch" in self.model_fields_set:
            if self.policy != "sorted":
                raise ValueError(
                    f"rollout_batch=auto is sorted's window-fit rule; policy {self.policy} "
                    "needs a number (or leave it unset)"
                )
        if self.policy != "sync" and self.update_batch > self.fixed_rollout_batch:
            raise ValueError(
                f"update_batch ({self.update_batch}) must not exceed rollout_batch "
                f"({self.fixed_rollout_batch}): an update needs that many complete groups "
                "in flight"
            )
        if self.policy != "sorted" and "update_pacing" not in self.model_fields_set:
            # Only sorted reads it: the others record it off, as every run did before it
            # became sorted's default, so their earlier checkpoints still match.
            object.__setattr__(self, "update_pacing", False)
        return self

    @classmethod
    def for_policy(cls, policy: str, **settings: object) -> SchedulerConfig:
        """A config for `policy` from settings meant for several policies (a side-by-side
        study): those this policy ignores are left out rather than refused."""
        cache = str(settings.get("cache", cls.model_fields["cache"].default))
        ignored = ignored_settings(policy, cache)
        return cls(policy=policy, **{k: v for k, v in settings.items() if k not in ignored})

    @classmethod
    def from_saved(cls, saved: dict[str, object]) -> SchedulerConfig:
        """The config that `saved` (its `model_dump`, as a run's run.json records it) came
        from. A dump holds every field, also those the policy ignores, which the validator
        refuses once set; so only the fields the policy reads and that differ from their
        defaults are set again (the validator derives the rest as it did the first time)."""
        fields = cls.model_fields
        policy = str(saved.get("policy", fields["policy"].default))
        cache = str(saved.get("cache", fields["cache"].default))
        ignored = ignored_settings(policy, cache)
        return cls(
            **{
                k: v
                for k, v in saved.items()
                if k not in ignored and (k not in fields or v != fields[k].default)
            }
        )

    @property
    def paces_updates(self) -> bool:
        """Whether updates are paced: `update_pacing` is read by `sorted` only."""
        return self.update_pacing and self.policy == "sorted"

    @property
    def uses_length_history(self) -> bool:
        """Whether the controller keeps a per-prompt length history."""
        return self.submit_order != "fifo" or self.paces_updates or self.adaptive_rollout_batch

    def differences(self, saved: dict[str, object]) -> str:
        """The settings this policy reads that differ in `saved` (a checkpoint's config dump),
        with both values; empty when none do. Settings the policy does not read (whose
        defaults may have changed since) are not compared."""
        ignored = ignored_settings(self.policy, self.cache)
        current = self.model_dump()
        keys = sorted(k for k in saved.keys() | current.keys() if k not in ignored)
        return ", ".join(
            f"{k} (checkpoint {saved.get(k)!r}, now {current.get(k)!r})"
            for k in keys
            if saved.get(k) != current.get(k)
        )

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
    def adaptive_rollout_batch(self) -> bool:
        """Whether `sorted` picks its own rollout batch (`rollout_batch: auto`)."""
        return self.policy == "sorted" and self.rollout_batch == "auto"

    @property
    def fixed_rollout_batch(self) -> int:
        """The rollout batch when it is a number: the one set, or partial's and async's
        under auto; an adaptive `sorted` starts at U (its rule's R is never below it)."""
        if isinstance(self.rollout_batch, int):
            return self.rollout_batch
        return self.update_batch if self.policy == "sorted" else FIXED_ROLLOUT_BATCH

    @property
    def effective_rollout_batch(self) -> int:
        """The fixed rollout batch (sync: update_batch); an adaptive `sorted` asks its
        controller (`Controller.rollout_batch`)."""
        return self.update_batch if self.policy == "sync" else self.fixed_rollout_batch
