"""The engine protocol: the only way the controller talks to a rollout engine.

An engine is asynchronous in the sense that matters for scheduling: `submit` returns at once,
and results stream back from `step`, which advances generation (one decode step for a real
engine, to the next event for the simulated one) and reports what finished and how busy the
engine was. Every engine reports time in seconds of its own clock (wall time for real engines,
virtual time for the simulated one); the run loop adds these up, it never reads a clock itself.

Policy versions are carried per token as run-length spans `[(version, n_tokens), ...]` so a
simulated million-response run does not store a list per token.

Optional engine methods, used when present (checkpoints): `rng_state()` returns the sampling
RNG's state and `set_rng_state(state)` restores it, so a resumed run samples the same tokens.
`settle() -> StepReport`, for an engine that keeps steps running between calls (the Ray replica
pool, whose replicas step by themselves): stop them after the step in progress and report it
like `step` does, so that nothing runs behind the controller's back; the run loop calls it
before the controller decides on an update.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal, Protocol, runtime_checkable

FinishReason = Literal["stop", "length", "abort"]
VersionSpans = list[tuple[int, int]]


@dataclass
class Partial:
    """A response generated so far: what an aborted request returns and a resumed one starts from."""

    n_tokens: int
    version_spans: VersionSpans
    token_ids: list[int] | None = None  # None for the simulated engine
    logprobs: list[float] | None = None  # behaviour log-probs of `token_ids`


@dataclass
class Request:
    """One response to generate (or to continue, when `resume` is set)."""

    request_id: str  # unique per attempt: an aborted and resumed response gets a new id
    prompt_id: str
    sample_index: int  # which of the group's `group_size` responses
    attempt: int  # 0 for the first try; +1 each time the response is regenerated from scratch
    prompt_len: int
    max_new_tokens: int  # cap on the whole response, resumed prefix included
    prompt_token_ids: list[int] | None = None  # None for the simulated engine
    resume: Partial | None = None
    epoch: int = 0  # which pass over the data admitted the prompt (lengths differ per epoch)


@dataclass
class Generation:
    """A finished (`stop`, `length`) or aborted (`abort`) response."""

    request_id: str
    finish_reason: FinishReason
    n_tokens: int  # whole response, resumed prefix included
    version_spans: VersionSpans
    token_ids: list[int] | None = None
    logprobs: list[float] | None = None
    # Scored where it was generated (a Ray replica scores its own responses); the run does
    # not score it again. None: not scored yet.
    score: Any = None

    def as_partial(self) -> Partial:
        return Partial(self.n_tokens, list(self.version_spans), self.token_ids, self.logprobs)


@dataclass
class StepReport:
    """What one `step` did.

    `busy_slot_s` is the integral of running sequences over the step's time, so the bubble
    ratio over any span is `1 - sum(busy_slot_s) / (capacity * sum(elapsed_s))`.
    """

    finished: list[Generation] = field(default_factory=list)
    elapsed_s: float = 0.0
    busy_slot_s: float = 0.0
    tokens_generated: int = 0  # new response tokens this step (resumed prefixes not counted)
    prefill_tokens: int = 0  # tokens prefilled this step (prompts and resumed prefixes)


@runtime_checkable
class Engine(Protocol):
    """What the controller needs from a rollout engine."""

    @property
    def capacity(self) -> int:
        """Engine capacity C: the most sequences it runs at once."""
        ...

    @property
    def version(self) -> int:
        """The policy version whose weights the engine serves."""
        ...

    def submit(self, requests: Sequence[Request]) -> None:
        """Queue requests; the engine starts them as capacity allows, in submission order."""
        ...

    def step(self) -> StepReport:
        """Advance generation; must make progress whenever `num_unfinished() > 0`."""
        ...

    def num_unfinished(self) -> int:
        """Requests submitted and not yet returned (running or queued inside the engine)."""
        ...

    def abort(self, request_ids: Sequence[str]) -> list[Generation]:
        """Stop these requests and return what each had generated (`finish_reason='abort'`)."""
        ...

    def pause(self) -> list[Generation]:
        """Stop everything and free the KV cache (so the trainer can use the memory).

        Returns every unfinished request as an aborted generation; resume one by submitting
        a new request with `resume` set to its partial (the engine re-prefills it).
        """
        ...

    def load_weights(self, weights: Any, version: int) -> float:
        """Serve `weights` as policy `version` from now on; returns the seconds it took.

        Running sequences continue under the new weights (their later tokens carry the new
        version). Colocated policies pause first, so nothing is running then.
        """
        ...


class EngineBase:
    """The engine's optional methods with their no-op defaults. Every engine derives from it
    and overrides what it has, so the loop and the run call these methods as they are and
    never probe an engine for them."""

    #: whether steps stay in flight between calls (the Ray replica pool): the loop then calls
    #: `settle` before every update decision
    steps_in_flight: bool = False
    #: requests the engine takes beyond its free slots and starts as slots free up (the Ray
    #: replica pool's backlogs: a slot is refilled without waiting for the driver)
    submit_ahead: int = 0
    #: the engine's own counters, copied into summary.json's `engine_stats`
    stats: Mapping[str, Any] = MappingProxyType({})

    def settle(self) -> StepReport:
        """Finish and report the steps still in flight (none here)."""
        return StepReport()

    def rng_state(self) -> Any:
        """The sampler's state for a checkpoint; None: the engine has none to save."""
        return None

    def set_rng_state(self, state: Any) -> None:
        """Restore what `rng_state` returned."""

    def close(self) -> None:
        """Free the engine's memory, threads and processes (idempotent)."""


# --- the trainer side -------------------------------------------------------------------------


@dataclass
class TrainSample:
    """One finished response in an update batch."""

    sample_index: int
    n_tokens: int
    finish_reason: FinishReason
    version_spans: VersionSpans  # policy version of each response token, run-length encoded
    reward: float = 0.0
    token_ids: list[int] | None = None
    logprobs: list[float] | None = None  # behaviour log-probs from the engine


@dataclass
class TrainGroup:
    """All `group_size` responses of one prompt: GRPO trains only complete groups."""

    prompt_id: str
    prompt_len: int
    samples: list[TrainSample]
    prompt_token_ids: list[int] | None = None


@dataclass
class UpdateBatch:
    """What one policy update trains on. `version` is the policy being updated; the update
    produces version + 1, and a token's staleness is `version - its generating version`."""

    version: int
    groups: list[TrainGroup]

    @property
    def num_tokens(self) -> int:
        return sum(s.n_tokens for g in self.groups for s in g.samples)


@dataclass
class UpdateResult:
    elapsed_s: float  # seconds the update took (virtual for the cost-model trainer)
    weights: Any = None  # handed to `Engine.load_weights`
    stats: dict[str, float] = field(default_factory=dict)  # loss, grad norm, ...
    skipped: bool = False  # e.g. a non-finite loss: the policy did not change


@runtime_checkable
class Trainer(Protocol):
    """Turns an update batch into new policy weights."""

    #: True for the cost-model trainer: `update` returns at once and `elapsed_s` is virtual time.
    virtual_time: bool

    def update(self, batch: UpdateBatch) -> UpdateResult: ...


@runtime_checkable
class CheckpointedTrainer(Trainer, Protocol):
    """A trainer whose state goes into a run's checkpoint, through one interface whether it
    lives in this process or is sharded over ranks."""

    def save_checkpoint(self, folder: str) -> dict[str, Any] | None:
        """The trainer's state, to keep in the checkpoint's `trainer.pt`; a sharded trainer
        instead writes every rank's part under `folder` and returns None."""
        ...

    def load_checkpoint(self, folder: str | None, state: dict[str, Any] | None) -> None:
        """Take back what `save_checkpoint` gave: `state` (from `trainer.pt`) or the sharded
        `folder`, the other being None. Raises ValueError, saying why, for a checkpoint the
        other kind of trainer wrote."""
        ...


class Backend(Protocol):
    """Where a training run's engine and trainer live (`cluster.backend`): this process, or
    Ray actors. The run asks it for the two once (the engine again after a failure) and closes
    it at the end; the controller and the loop never see which one it is."""

    #: whether the engine replaces its own failed parts (a replica pool), so the run loop must
    #: not rebuild it
    engine_restarts_itself: bool

    def trainer(self, model: Any) -> Trainer:
        """The trainer that updates `model`'s weights."""
        ...

    def engine(
        self, model: Any, tokenizer: Any, version: int, problems_by_id: dict[str, Any]
    ) -> Engine:
        """An engine serving `model`'s current weights as policy `version`;
        `problems_by_id` lets an engine that scores its own responses find their problems."""
        ...

    def evaluator(self, engine: Engine) -> Callable[..., list[Generation]] | None:
        """`generate(requests, temperature, top_p, seed)` where evaluation runs on `engine`'s
        side (the Ray replicas), so the driver needs no current weights; None: evaluation
        runs in this process on the driver's model."""
        ...

    def close(self) -> None:
        """Release the processes and devices (idempotent)."""
        ...
