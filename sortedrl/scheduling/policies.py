"""The four scheduling policies, each a small piece over the same controller.

A policy answers two questions: how many new prompts to admit now, and whether the engine
pauses while the trainer updates (colocated) or keeps generating (async). When updates happen
(`update_batch` complete groups), what they train (oldest tokens first, then in completion
order: short before long within a version) and how stale work is handled
(`SchedulerConfig.staleness_limit`) are shared by all of them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Protocol

from sortedrl.scheduling.config import SchedulerConfig


class PolicyView(Protocol):
    """What a policy may look at."""

    config: SchedulerConfig

    @property
    def version(self) -> int: ...
    @property
    def open_groups(self) -> int: ...  # admitted, not yet trained or dropped
    @property
    def live_admitted(self) -> int: ...  # admitted and not dropped, over the whole run
    @property
    def generating_groups(self) -> int: ...  # open groups not yet complete
    @property
    def rollout_batch(self) -> int: ...  # R now: the setting, or sorted's window-fit choice


class Policy(ABC):
    name = "base"
    colocated = True  # engine and trainer share the devices and take turns

    @abstractmethod
    def prompts_to_admit(self, view: PolicyView, free_slots: int) -> int:
        """New prompts to admit now; `free_slots` is what the engine could start beyond the
        controller's own queue."""


class Sync(Policy):
    """Admit one update batch, wait for all of it, update, repeat (verl/TRL/OpenRLHF default)."""

    name = "sync"

    def prompts_to_admit(self, view: PolicyView, free_slots: int) -> int:
        # Top up only when a group was dropped (e.g. filtered): the batch must reach U groups.
        return max(0, view.config.update_batch - view.open_groups)


class Sorted(Policy):
    """SortedRL: admit a whole round of `rollout_batch` prompts; updates consume it short to
    long as groups complete; the next round starts when this one is consumed."""

    name = "sorted"

    def prompts_to_admit(self, view: PolicyView, free_slots: int) -> int:
        cfg = view.config
        if cfg.effective_admission == "fill" and free_slots >= cfg.group_size:
            # Keep the engine full: start the next round's prompts as slots free up.
            return min(free_slots // cfg.group_size, view.rollout_batch - view.open_groups)
        if view.open_groups == 0:
            return view.rollout_batch
        # A round whose remainder cannot fill an update batch (rollout_batch not a multiple of
        # update_batch, or groups were filtered) is topped up so the next update can happen.
        return max(0, cfg.update_batch - view.open_groups)


class PartialRollout(Policy):
    """Kimi k1.5 / APRIL partial rollout: keep `rollout_batch` prompts in flight, update at
    `update_batch` complete groups, resume the unfinished ones first in the next step."""

    name = "partial"

    def prompts_to_admit(self, view: PolicyView, free_slots: int) -> int:
        return max(0, view.rollout_batch - view.open_groups)


class Async(Policy):
    """AReaL-style asynchronous RL: rollout never pauses; the trainer takes complete groups as
    they come; admission is throttled so no group can be older than `max_staleness` versions
    when trained (at most (version + max_staleness + 1) * update_batch groups admitted)."""

    name = "async"
    colocated = False

    def prompts_to_admit(self, view: PolicyView, free_slots: int) -> int:
        cfg = view.config
        window = (view.version + cfg.max_staleness + 1) * cfg.update_batch - view.live_admitted
        return max(0, min(view.rollout_batch - view.generating_groups, window))


POLICY_CLASSES: dict[str, type[Policy]] = {
    "sync": Sync,
    "sorted": Sorted,
    "partial": PartialRollout,
    "async": Async,
}


def make_policy(config: SchedulerConfig) -> Policy:
    return POLICY_CLASSES[config.policy]()
