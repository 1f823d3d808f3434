"""The stateful controller: owns every prompt and response, decides admission, updates, what
each update trains, and what happens to stale work.

The algorithm, as DESIGN.md section 2 reads SortedRL:

1. Admit prompts as the policy says (sorted: a round of `rollout_batch` prompts), each as a
   group of `group_size` responses; submit them to the engine as its slots free, resumed
   partials and protected groups first.
2. Record finished responses in the rollout buffer. Responses finish roughly in length order,
   so groups complete short first.
3. Once `update_batch` groups are complete (and no protected group is still generating), the
   update trains the `update_batch` complete groups that completed first: shortest first, a
   micro-curriculum within each round.
4. After the update every piece of work still held is checked against the staleness limit
   (`drop`: 0, `keep`: `max_staleness`): work that could no longer be trained within the limit
   is discarded (its tokens counted as wasted) and regenerated from scratch, the rest resumes.
   A prompt whose work was discarded more than `max_regenerations` times becomes protected:
   updates wait for its group to complete, so it is trained on-policy and cannot starve.

Every admitted prompt ends trained or dropped with a counted reason (see `Ledger`).
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict
from typing import Any

from sortedrl.scheduling.buffer import RolloutBuffer
from sortedrl.scheduling.config import SchedulerConfig
from sortedrl.scheduling.lengths import LengthTracker
from sortedrl.scheduling.metrics import Ledger, UpdateRecord
from sortedrl.scheduling.policies import Policy, make_policy
from sortedrl.scheduling.protocol import (
    Generation,
    Partial,
    Request,
    TrainGroup,
    TrainSample,
    UpdateBatch,
)
from sortedrl.scheduling.state import Group, GroupState, PromptSpec, Seq, SeqState

# Queue priority classes: lower goes first.
_PROTECTED, _RESUME, _ADMITTED = 0, 1, 2


class Controller:
    def __init__(self, config: SchedulerConfig, prompts: Iterable[PromptSpec]) -> None:
        self.config = config
        self.policy: Policy = make_policy(config)
        self.buffer = RolloutBuffer()
        self.ledger = Ledger()
        self._prompts: Iterator[PromptSpec] = iter(prompts)
        self._next_spec: PromptSpec | None = next(self._prompts, None)
        self._version = 0
        self._groups: dict[int, Group] = {}  # open groups by admission order
        # Heap of (priority, rank, ticket, seq); an entry is live only while seq.ticket ==
        # ticket. rank orders a priority class (0 for fifo, -predicted remaining length).
        self._queue: list[tuple[int, float, int, Seq]] = []
        self._tickets = 0
        self._n_queued = 0
        self._n_protected = 0  # open protected groups, at most update_batch
        self._protect_waitlist: deque[Group] = deque()  # past the limit, waiting to be protected
        self._running: dict[str, Seq] = {}  # request_id -> seq
        self._next_request = 0
        self._admitted = 0
        self._dropped_groups = 0
        self._in_update: list[Group] | None = None
        # Length-aware scheduling (submit_order, update_pacing): see scheduling/lengths.py.
        self._lengths = LengthTracker(config.max_new_tokens) if config.uses_length_history else None

    # --- what policies look at ----------------------------------------------------------------
    @property
    def version(self) -> int:
        return self._version

    @property
    def open_groups(self) -> int:
        return len(self._groups)

    @property
    def generating_groups(self) -> int:
        in_update = len(self._in_update) if self._in_update else 0
        return len(self._groups) - self.buffer.num_complete() - in_update

    @property
    def live_admitted(self) -> int:
        return self._admitted - self._dropped_groups

    @property
    def colocated(self) -> bool:
        return self.policy.colocated

    def current_round(self) -> int:
        """The oldest round (rollout batch) with a prompt still open; -1 when none is."""
        first = next(iter(self._groups.values()), None)
        return first.round if first is not None else -1

    def response_key(self, request_id: str) -> tuple[str, int]:
        """(prompt_id, sample_index) of a running request."""
        seq = self._running[request_id]
        return seq.group.prompt_id, seq.index

    @property
    def exhausted(self) -> bool:
        return self._next_spec is None

    # --- admission and submission -------------------------------------------------------------
    def requests_to_submit(self, free_slots: int) -> list[Request]:
        """Admit prompts as the policy allows, then hand out up to `free_slots` requests."""
        if self._in_update is None or not self.colocated:
            spare = free_slots - self._n_queued
            self._admit(self.policy.prompts_to_admit(self, spare))
        out: list[Request] = []
        while self._queue and len(out) < free_slots:
            _, _, ticket, seq = heapq.heappop(self._queue)
            if seq.ticket == ticket and seq.state is SeqState.QUEUED:
                self._n_queued -= 1
                out.append(self._make_request(seq))
        return out

    def _admit(self, n: int) -> None:
        cfg = self.config
        for _ in range(n):
            spec = self._next_spec
            if spec is None:
                return
            self._next_spec = next(self._prompts, None)
            group = Group(spec, self._admitted, self._admitted // cfg.effective_rollout_batch)
            group.seqs = [Seq(group, i) for i in range(cfg.group_size)]
            self._groups[group.order] = group
            self._admitted += 1
            self.ledger.prompts_admitted += 1
            for seq in group.seqs:
                self._enqueue(seq, _ADMITTED)

    def _enqueue(self, seq: Seq, priority: int, rank: float | None = None) -> None:
        if seq.group.protected:
            priority = _PROTECTED
        if seq.state is not SeqState.QUEUED or seq.ticket < 0:  # not yet counted as queued
            self._n_queued += 1
        seq.state = SeqState.QUEUED
        seq.ticket = self._tickets  # any older entry of this seq is now dead
        if rank is None:
            rank = 0.0
            if self._lengths is not None and self.config.submit_order != "fifo":
                rank = self._lengths.rank(seq)
        heapq.heappush(self._queue, (priority, rank, self._tickets, seq))
        self._tickets += 1

    def _make_request(self, seq: Seq) -> Request:
        rid = f"r{self._next_request}"
        self._next_request += 1
        seq.state = SeqState.GENERATING
        seq.request_id = rid
        seq.submitted_prefix = seq.n_tokens
        seq.first_version = seq.oldest_version if seq.n_tokens else self._version
        self._running[rid] = seq
        if self._lengths is not None:
            self._lengths.submitted(rid)
        spec = seq.group.spec
        return Request(
            request_id=rid,
            prompt_id=spec.prompt_id,
            sample_index=seq.index,
            attempt=seq.attempt,
            prompt_len=spec.prompt_len,
            max_new_tokens=self.config.max_new_tokens,
            prompt_token_ids=spec.prompt_token_ids,
            resume=seq.content if seq.n_tokens else None,
            epoch=spec.epoch,
        )

    # --- engine results -----------------------------------------------------------------------
    def on_generations(
        self, generations: Sequence[Generation], rewards: Sequence[float] | None = None
    ) -> None:
        """Finished responses from an engine step (rewards already scored, if any)."""
        for i, gen in enumerate(generations):
            seq = self._take_running(gen)
            if gen.finish_reason == "abort":
                # An engine may give up on a request on its own (e.g. it was restarted);
                # the partial resumes like one from a pause.
                self._hold_partial(seq, gen)
                self._enqueue(seq, _RESUME)
                continue
            seq.content = gen.as_partial()
            seq.finish_reason = gen.finish_reason
            seq.reward = rewards[i] if rewards is not None else 0.0
            if self._lengths is not None:
                self._lengths.history.record(seq.group.prompt_id, gen.n_tokens)
            if self.buffer.add_finished(seq):
                self._on_group_complete(seq.group)

    def _take_running(self, gen: Generation) -> Seq:
        seq = self._running.pop(gen.request_id, None)
        if self._lengths is not None:
            self._lengths.returned(gen.request_id)
        if seq is None:
            raise RuntimeError(f"engine returned unknown or duplicate request {gen.request_id!r}")
        self.ledger.tokens_generated += gen.n_tokens - seq.submitted_prefix
        return seq

    def _hold_partial(self, seq: Seq, gen: Generation) -> None:
        seq.content = gen.as_partial() if gen.n_tokens else None

    def _on_group_complete(self, group: Group) -> None:
        if self.config.filter_equal_rewards and len(group.seqs) > 1:
            first = group.seqs[0].reward
            if all(s.reward == first for s in group.seqs):
                self._drop_group(group, "equal_rewards")

    def _drop_group(self, group: Group, reason: str) -> None:
        for seq in group.seqs:
            if seq.state is SeqState.GENERATING:
                raise RuntimeError("cannot drop a group while the engine still runs it")
            if seq.n_tokens:
                self.ledger.tokens_wasted[reason] += seq.n_tokens
            if seq.state is SeqState.QUEUED:
                self._n_queued -= 1
            seq.state = SeqState.DONE  # its queue entries, if any, are dead now
        self.buffer.forget(group)
        self._close(group, GroupState.DROPPED)
        self._dropped_groups += 1
        self.ledger.prompts_dropped[reason] += 1

    def _close(self, group: Group, state: GroupState) -> None:
        group.state = state
        del self._groups[group.order]
        if group.protected:
            self._n_protected -= 1
            self._promote()

    # --- updates ------------------------------------------------------------------------------
    def update_due(self, trainer_busy: bool = False) -> bool:
        """True when an update should start now."""
        if trainer_busy or self._in_update is not None:
            return False
        complete = self.buffer.num_complete()
        if complete == 0:
            return False
        # A protected group is still generating: the update waits for it (no starvation).
        if self._n_protected and any(
            g.protected and g.state is GroupState.ACTIVE for g in self._groups.values()
        ):
            return False
        if complete >= self.config.update_batch:
            return not (self.config.update_pacing and self._pacing_holds())
        # End of data: train what is left rather than lose it.
        return self.exhausted and complete == len(self._groups)

    def take_update_batch(self) -> UpdateBatch:
        """The groups the next update trains: protected groups first, then in completion order
        (short first). The engine must have been paused first when the policy is colocated."""
        assert self._in_update is None, "an update is already in progress"
        if self._lengths is not None:
            self._lengths.new_update()
        candidates = self.buffer.complete_groups()
        candidates.sort(key=lambda g: (not g.protected, _oldest(g), g.completed_seq))
        # At most update_batch groups are protected at once, so all of them fit here.
        chosen = candidates[: self.config.update_batch]
        self.buffer.pop_groups(chosen)
        self._in_update = chosen
        return UpdateBatch(self._version, [self._train_group(g) for g in chosen])

    @staticmethod
    def _train_group(group: Group) -> TrainGroup:
        samples = []
        for s in group.seqs:
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
        spec = group.spec
        return TrainGroup(spec.prompt_id, spec.prompt_len, samples, spec.prompt_token_ids)

    def on_paused(self, partials: Sequence[Generation]) -> None:
        """The engine was paused (colocated update): running responses become cached partials."""
        for gen in partials:
            seq = self._take_running(gen)
            self._hold_partial(seq, gen)
            self.buffer.cache(seq)

    def on_update_done(self, skipped: bool = False) -> list[str]:
        """The update finished: account for it, move to the next version (unless skipped),
        and apply the staleness limit. Returns request ids the engine must abort (async:
        responses still running whose oldest token became too stale)."""
        assert self._in_update is not None, "no update in progress"
        batch, self._in_update = self._in_update, None
        ledger = self.ledger
        if skipped:
            # The policy did not change (e.g. a non-finite loss): the batch taught nothing, so
            # it is dropped with a counted reason rather than counted as trained.
            for group in batch:
                self._drop_group(group, "skipped_update")
            batch = []
        for group in batch:
            for seq in group.seqs:
                assert seq.content is not None
                ledger.tokens_trained += seq.n_tokens
                ledger.samples_trained += 1
                ledger.add_trained_spans(self._version, seq.content.version_spans)
                seq.state = SeqState.DONE
            self._close(group, GroupState.TRAINED)
            ledger.prompts_trained += 1
        if not skipped:
            self._version += 1
        # Cached partials resume first; everything held is then checked against the limit.
        for seq in self.buffer.take_cached():
            self._enqueue(seq, _RESUME)
        return self._enforce_staleness()

    def _too_stale(self, seq: Seq) -> bool:
        limit = self.config.staleness_limit
        oldest = seq.oldest_version
        return limit is not None and oldest is not None and self._version - oldest > limit

    def _enforce_staleness(self) -> list[str]:
        to_abort: list[str] = []
        if self.config.staleness_limit is None:
            return to_abort
        for group in list(self._groups.values()):
            hit = False
            for seq in group.seqs:
                if not self._too_stale(seq):
                    continue
                if seq.state is SeqState.GENERATING:
                    assert seq.request_id is not None
                    to_abort.append(seq.request_id)  # discarded when the abort comes back
                    continue
                hit = True
                reason = "stale_finished" if seq.state is SeqState.FINISHED else "stale_partial"
                if seq.state is SeqState.FINISHED:
                    self.buffer.remove_finished(seq)
                self._discard(seq, reason)
            if hit:
                self._count_regeneration(group)
        return to_abort

    def on_aborted(self, generations: Sequence[Generation]) -> None:
        """Responses aborted after `on_update_done` asked for it: discard and regenerate."""
        groups: dict[int, Group] = {}
        for gen in generations:
            seq = self._take_running(gen)
            self._hold_partial(seq, gen)
            self._discard(seq, "stale_partial")
            groups[seq.group.order] = seq.group
        for group in groups.values():
            self._count_regeneration(group)

    def _discard(self, seq: Seq, reason: str) -> None:
        self.ledger.tokens_wasted[reason] += seq.n_tokens
        self.ledger.regenerations += 1
        seq.content = None
        seq.finish_reason = None
        seq.attempt += 1
        seq.reward = 0.0
        self._enqueue(seq, _ADMITTED)

    def _count_regeneration(self, group: Group) -> None:
        group.regenerations += 1
        if group.regenerations == self.config.max_regenerations + 1:
            self._protect_waitlist.append(group)
            self._promote()

    def _promote(self) -> None:
        """Protect waiting groups, first come first served, while fewer than update_batch are:
        the update that waits for them must be able to train them all."""
        while self._protect_waitlist and self._n_protected < self.config.update_batch:
            group = self._protect_waitlist.popleft()
            if not group.open:
                continue
            group.protected = True
            self._n_protected += 1
            for seq in group.seqs:
                if seq.state is SeqState.QUEUED:
                    self._enqueue(seq, _PROTECTED)  # re-push at the front; old entry dies

    # --- the end ------------------------------------------------------------------------------
    def done(self) -> bool:
        """All data admitted and every admitted prompt trained or dropped."""
        return self.exhausted and not self._groups and self._in_update is None

    def in_flight(self) -> tuple[int, int]:
        """(open prompts, tokens held in open groups): what a run stopped early leaves."""
        tokens = sum(s.n_tokens for g in self._groups.values() for s in g.seqs)
        return len(self._groups), tokens

    def stop(self, aborted: Sequence[Generation]) -> None:
        """A run stopped early (or for a checkpoint): take back what the engine was running;
        it resumes first if the run goes on (and counts as in flight if it does not)."""
        for gen in aborted:
            seq = self._take_running(gen)
            self._hold_partial(seq, gen)
            self._enqueue(seq, _RESUME)

    def requeue_running(self) -> int:
        """The engine died: everything it was running goes back to the queue, resumed from
        what the controller last held (tokens generated since were never returned, so never
        counted). Returns how many responses were requeued."""
        lost = list(self._running.values())
        self._running.clear()
        if self._lengths is not None:
            self._lengths.forget_running()
        for seq in lost:
            self._enqueue(seq, _RESUME)
        return len(lost)

    # --- length-aware scheduling (issue #10): see scheduling/lengths.py ---------------------
    def observe_step(
        self, tokens_generated: int, busy_slot_s: float, elapsed_s: float, capacity: int
    ) -> None:
        """An engine step's report (what the length tracker estimates progress from)."""
        if self._lengths is not None:
            self._lengths.observe_step(tokens_generated, busy_slot_s, elapsed_s, capacity)

    def _pacing_holds(self) -> bool:
        assert self._lengths is not None  # update_pacing keeps a length history
        admit = 0
        cfg = self.config
        if cfg.effective_admission == "fill" and not self.exhausted:
            admit = max(0, cfg.rollout_batch - len(self._groups)) * cfg.group_size
        return self._lengths.pacing_holds(
            cfg,
            self._version,
            self._groups.values(),
            self._running.values(),
            self._n_queued + admit,
        )


def _oldest(group: Group) -> int:
    """Version of a complete group's oldest token: the closest to the staleness limit."""
    return min(s.content.version_spans[0][0] for s in group.seqs if s.content and s.n_tokens)


# --- checkpoints ------------------------------------------------------------------------------
# The controller's whole state as plain JSON-able data (no pickle): taken between updates with
# nothing running in the engine (pause it first), restored into a controller built with the
# same config and the same prompt source.


def _seq_state(seq: Seq) -> dict[str, Any]:
    c = seq.content
    return {
        "index": seq.index,
        "attempt": seq.attempt,
        "state": seq.state.value,
        "finish_reason": seq.finish_reason,
        "reward": seq.reward,
        "content": None
        if c is None
        else {
            "n_tokens": c.n_tokens,
            "version_spans": [list(x) for x in c.version_spans],
            "token_ids": c.token_ids,
            "logprobs": c.logprobs,
        },
    }


def controller_state(ctl: Controller) -> dict[str, Any]:
    """Everything needed to go on exactly where `ctl` is; raises if the engine still runs
    responses or an update is in progress."""
    if ctl._running:
        raise RuntimeError("checkpoint with responses still in the engine: pause it first")
    if ctl._in_update is not None:
        raise RuntimeError("checkpoint during an update")
    queue = sorted(e for e in ctl._queue if e[3].ticket == e[2] and e[3].state is SeqState.QUEUED)
    ledger = ctl.ledger
    return {
        "format": 1,
        "config": ctl.config.model_dump(),
        "version": ctl._version,
        "admitted": ctl._admitted,
        "dropped_groups": ctl._dropped_groups,
        "next_request": ctl._next_request,
        "groups": [
            {
                "prompt_id": g.spec.prompt_id,
                "prompt_len": g.spec.prompt_len,
                "prompt_token_ids": g.spec.prompt_token_ids,
                "epoch": g.spec.epoch,
                "order": g.order,
                "round": g.round,
                "state": g.state.value,
                "n_finished": g.n_finished,
                "regenerations": g.regenerations,
                "protected": g.protected,
                "completed_seq": g.completed_seq,
                "seqs": [_seq_state(s) for s in g.seqs],
            }
            for g in ctl._groups.values()
        ],
        "queue": [[p, s.group.order, s.index, r] for p, r, _, s in queue],
        "complete": [g.order for g in ctl.buffer.complete_groups()],
        "completions": ctl.buffer._completions,
        "cached": [[s.group.order, s.index] for s in ctl.buffer._cached],
        "protect_waitlist": [g.order for g in ctl._protect_waitlist if g.open],
        "ledger": {
            "prompts_admitted": ledger.prompts_admitted,
            "prompts_trained": ledger.prompts_trained,
            "prompts_dropped": dict(ledger.prompts_dropped),
            "samples_trained": ledger.samples_trained,
            "tokens_generated": ledger.tokens_generated,
            "tokens_trained": ledger.tokens_trained,
            "tokens_wasted": dict(ledger.tokens_wasted),
            "staleness_hist": {str(k): v for k, v in ledger.staleness_hist.items()},
            "regenerations": ledger.regenerations,
            "updates": [asdict(u) for u in ledger.updates],
        },
        "lengths": lengths_state(ctl),
    }


def restore_controller(
    config: SchedulerConfig, prompts: Iterable[PromptSpec], state: dict[str, Any]
) -> Controller:
    """A controller that goes on from `state` (see `controller_state`). `prompts` must be the
    same source the checkpointed run used; the ones it had admitted are skipped."""
    if state.get("format") != 1:
        raise ValueError(f"unknown controller checkpoint format {state.get('format')!r}")
    saved = SchedulerConfig.model_validate(state["config"])
    if saved != config:
        diff = sorted(
            k for k in type(config).model_fields if getattr(saved, k) != getattr(config, k)
        )
        raise ValueError(f"scheduler settings differ from the checkpoint's: {', '.join(diff)}")
    it = iter(prompts)
    for _ in range(state["admitted"]):
        if next(it, None) is None:
            raise ValueError("the prompt source is shorter than what the checkpoint admitted")
    ctl = Controller(config, it)
    ctl._version = state["version"]
    ctl._admitted = state["admitted"]
    ctl._dropped_groups = state["dropped_groups"]
    ctl._next_request = state["next_request"]
    for gs in state["groups"]:
        spec = PromptSpec(
            gs["prompt_id"], gs["prompt_len"], gs["prompt_token_ids"], gs.get("epoch", 0)
        )
        group = Group(spec, gs["order"], gs["round"])
        group.state = GroupState(gs["state"])
        group.n_finished = gs["n_finished"]
        group.regenerations = gs["regenerations"]
        group.protected = gs["protected"]
        group.completed_seq = gs["completed_seq"]
        for ss in gs["seqs"]:
            seq = Seq(group, ss["index"], ss["attempt"], SeqState(ss["state"]))
            seq.finish_reason = ss["finish_reason"]
            seq.reward = ss["reward"]
            c = ss["content"]
            if c is not None:
                spans = [(int(v), int(n)) for v, n in c["version_spans"]]
                seq.content = Partial(c["n_tokens"], spans, c["token_ids"], c["logprobs"])
            seq.submitted_prefix = seq.n_tokens
            group.seqs.append(seq)
        ctl._groups[group.order] = group
        if group.protected:
            ctl._n_protected += 1
    groups = ctl._groups
    for order in state["complete"]:
        ctl.buffer._complete[order] = groups[order]
    ctl.buffer._completions = state["completions"]
    for order, index in state["cached"]:
        ctl.buffer._cached.append(groups[order].seqs[index])
    restore_lengths(ctl, state.get("lengths"))  # before the queue: its ranks may use it
    for priority, order, index, *rank in state["queue"]:
        ctl._enqueue(groups[order].seqs[index], priority, rank[0] if rank else None)
    ctl._protect_waitlist.extend(groups[o] for o in state["protect_waitlist"])
    lg, ledger = state["ledger"], ctl.ledger
    ledger.prompts_admitted = lg["prompts_admitted"]
    ledger.prompts_trained = lg["prompts_trained"]
    ledger.prompts_dropped.update(lg["prompts_dropped"])
    ledger.samples_trained = lg["samples_trained"]
    ledger.tokens_generated = lg["tokens_generated"]
    ledger.tokens_trained = lg["tokens_trained"]
    ledger.tokens_wasted.update(lg["tokens_wasted"])
    ledger.staleness_hist.update({int(k): v for k, v in lg["staleness_hist"].items()})
    ledger.regenerations = lg["regenerations"]
    ledger.updates = [UpdateRecord(**u) for u in lg["updates"]]
    return ctl


# The length-aware part of the controller's state, one pair so it can move with the rest.
def lengths_state(ctl: Controller) -> dict[str, Any] | None:
    """Decode steps counted so far and the per-prompt length history (None when unused)."""
    return None if ctl._lengths is None else ctl._lengths.state_dict()


def restore_lengths(ctl: Controller, state: dict[str, Any] | None) -> None:
    """Put back what `lengths_state` saved (a checkpoint without it starts a fresh history)."""
    if state is None:
        return
    if ctl._lengths is not None:
        ctl._lengths.load_state_dict(state)
