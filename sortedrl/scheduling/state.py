"""The records the controller owns: one per prompt (a group) and one per response slot.

Response state machine (a slot keeps its record across regenerations):

    QUEUED ──submit──> GENERATING ──finished──> FINISHED ──group trained──> (group TRAINED)
      ▲                   │  pause                 │
      │                   ▼                        │ too stale after an update
      └──resume──────── CACHED ───too stale────────┴──> discarded: tokens wasted, QUEUED again
                                                                 as a fresh attempt

Group state machine: ACTIVE (some response not finished) <-> COMPLETE (all `group_size`
finished) -> TRAINED, or DROPPED with a counted reason from any non-terminal state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from sortedrl.scheduling.protocol import FinishReason, Partial, TrainGroup, TrainSample


class SeqState(str, Enum):
    QUEUED = "queued"  # waiting in the controller to be submitted (fresh, or to resume)
    GENERATING = "generating"  # submitted to the engine
    CACHED = "cached"  # a partial response held while the engine is paused
    FINISHED = "finished"  # a complete response waiting for the rest of its group
    DONE = "done"  # its group was trained or dropped


class GroupState(str, Enum):
    ACTIVE = "active"
    COMPLETE = "complete"
    TRAINED = "trained"
    DROPPED = "dropped"


@dataclass(frozen=True)
class PromptSpec:
    """A prompt the controller may admit."""

    prompt_id: str
    prompt_len: int
    prompt_token_ids: list[int] | None = None
    epoch: int = 0  # which pass over the data this is
    # The data record the prompt is drawn from, which the length history is keyed on, so a
    # record's lengths in earlier epochs predict its later ones. None: the prompt id is the
    # record (the simulator, where one prompt id recurs per epoch); `sortedrl train` gives each
    # admission its own prompt id and names the record by its prompt text.
    record_id: str | None = None

    @property
    def history_key(self) -> str:
        """The key of this prompt's lengths in the length history."""
        return self.prompt_id if self.record_id is None else self.record_id


@dataclass(eq=False)
class Seq:
    group: Group
    index: int
    attempt: int = 0
    state: SeqState = SeqState.QUEUED
    content: Partial | None = None  # tokens generated so far (partial or finished)
    finish_reason: FinishReason | None = None
    request_id: str | None = None
    submitted_prefix: int = 0  # tokens already in `content` when it was last submitted
    first_version: int | None = None  # version of its oldest token, known from submission on
    reward: float = 0.0
    ticket: int = -1  # identifies its live entry in the controller's queue (lazy deletion)

    @property
    def n_tokens(self) -> int:
        return self.content.n_tokens if self.content else 0

    @property
    def oldest_version(self) -> int | None:
        if self.content is not None and self.content.n_tokens:
            return self.content.version_spans[0][0]
        # A running response with nothing returned yet: its first token's version.
        return self.first_version if self.state is SeqState.GENERATING else None

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON-able data (taken with nothing running, so no request id is kept)."""
        c = self.content
        return {
            "index": self.index,
            "attempt": self.attempt,
            "state": self.state.value,
            "finish_reason": self.finish_reason,
            "reward": self.reward,
            "content": None
            if c is None
            else {
                "n_tokens": c.n_tokens,
                "version_spans": [list(x) for x in c.version_spans],
                "token_ids": c.token_ids,
                "logprobs": c.logprobs,
            },
        }

    @classmethod
    def from_state_dict(cls, group: Group, state: dict[str, Any]) -> Seq:
        seq = cls(group, state["index"], state["attempt"], SeqState(state["state"]))
        seq.finish_reason = state["finish_reason"]
        seq.reward = state["reward"]
        c = state["content"]
        if c is not None:
            spans = [(int(v), int(n)) for v, n in c["version_spans"]]
            seq.content = Partial(c["n_tokens"], spans, c["token_ids"], c["logprobs"])
        seq.submitted_prefix = seq.n_tokens
        return seq


@dataclass(eq=False)
class Group:
    spec: PromptSpec
    order: int  # admission order, 0-based
    round: int  # which rollout batch admitted it
    seqs: list[Seq] = field(default_factory=list)
    state: GroupState = GroupState.ACTIVE
    n_finished: int = 0
    regenerations: int = 0  # updates at which some of its work was discarded
    protected: bool = False  # past `max_regenerations`: updates wait for it (no starvation)
    completed_seq: int = -1  # completion order among all groups, for short-first batches

    @property
    def prompt_id(self) -> str:
        return self.spec.prompt_id

    @property
    def open(self) -> bool:
        return self.state in (GroupState.ACTIVE, GroupState.COMPLETE)

    @property
    def oldest_version(self) -> int:
        """Version of a complete group's oldest token: the closest to the staleness limit."""
        return min(s.content.version_spans[0][0] for s in self.seqs if s.content and s.n_tokens)

    def train_group(self) -> TrainGroup:
        """This complete group as the trainer sees it."""
        samples = []
        for s in self.seqs:
            c = s.content
            assert c is not None and s.finish_reason is not None
            samples.append(
                TrainSample(
                    s.index,
                    c.n_tokens,
                    s.finish_reason,
                    list(c.version_spans),
                    s.reward,
                    c.token_ids,
                    c.logprobs,
                )
            )
        spec = self.spec
        return TrainGroup(spec.prompt_id, spec.prompt_len, samples, spec.prompt_token_ids)

    def state_dict(self) -> dict[str, Any]:
        spec = self.spec
        return {
            "prompt_id": spec.prompt_id,
            "prompt_len": spec.prompt_len,
            "prompt_token_ids": spec.prompt_token_ids,
            "epoch": spec.epoch,
            "record_id": spec.record_id,
            "order": self.order,
            "round": self.round,
            "state": self.state.value,
            "n_finished": self.n_finished,
            "regenerations": self.regenerations,
            "protected": self.protected,
            "completed_seq": self.completed_seq,
            "seqs": [s.state_dict() for s in self.seqs],
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> Group:
        spec = PromptSpec(
            state["prompt_id"],
            state["prompt_len"],
            state["prompt_token_ids"],
            state["epoch"],
            state["record_id"],
        )
        group = cls(spec, state["order"], state["round"])
        group.state = GroupState(state["state"])
        group.n_finished = state["n_finished"]
        group.regenerations = state["regenerations"]
        group.protected = state["protected"]
        group.completed_seq = state["completed_seq"]
        group.seqs = [Seq.from_state_dict(group, ss) for ss in state["seqs"]]
        return group
