"""The rollout buffer: complete groups waiting for an update, and partials cached across one."""

from __future__ import annotations

from typing import Any

from sortedrl.scheduling.state import Group, GroupState, Seq, SeqState


class RolloutBuffer:
    def __init__(self) -> None:
        self._complete: dict[int, Group] = {}  # by admission order; insertion = completion order
        self._cached: list[Seq] = []  # partials held while the engine is paused
        self._completions = 0

    # --- finished responses -------------------------------------------------------------------
    def add_finished(self, seq: Seq) -> bool:
        """Record a finished response; returns True when it completes its group."""
        group = seq.group
        seq.state = SeqState.FINISHED
        group.n_finished += 1
        if group.n_finished == len(group.seqs):
            group.state = GroupState.COMPLETE
            group.completed_seq = self._completions
            self._completions += 1
            self._complete[group.order] = group
            return True
        return False

    def remove_finished(self, seq: Seq) -> None:
        """A finished response was discarded: its group is open again."""
        group = seq.group
        group.n_finished -= 1
        if group.state is GroupState.COMPLETE:
            group.state = GroupState.ACTIVE
            del self._complete[group.order]

    def num_complete(self) -> int:
        return len(self._complete)

    def complete_groups(self) -> list[Group]:
        return list(self._complete.values())

    def pop_groups(self, groups: list[Group]) -> None:
        for g in groups:
            del self._complete[g.order]

    def forget(self, group: Group) -> None:
        """A group is dropped: it is no longer waiting for an update, if it was."""
        self._complete.pop(group.order, None)

    # --- cached partials ----------------------------------------------------------------------
    def cache(self, seq: Seq) -> None:
        seq.state = SeqState.CACHED
        self._cached.append(seq)

    def take_cached(self) -> list[Seq]:
        cached, self._cached = self._cached, []
        return cached

    # --- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Groups are named by admission order, responses by (order, index)."""
        return {
            "complete": list(self._complete),
            "completions": self._completions,
            "cached": [[s.group.order, s.index] for s in self._cached],
        }

    def load_state_dict(self, state: dict[str, Any], groups: dict[int, Group]) -> None:
        """Restore into an empty buffer; `groups` are the controller's open groups by order."""
        assert not self._complete and not self._cached, "load into a fresh buffer"
        self._complete = {order: groups[order] for order in state["complete"]}
        self._completions = state["completions"]
        self._cached = [groups[order].seqs[index] for order, index in state["cached"]]
