"""The stateful controller: owns every prompt and response, decides admission, updates, what
each update trains, and what happens to stale work.

The algorithm it carries out is told once, in docs/design.md ("The algorithm as built"):
admission, submission order, completion, the update trigger, what an update trains, the
staleness check after it and protection against starvation. Read that page beside this file.

Every admitted prompt ends trained or dropped with a counted reason (see `Ledger`).
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from sortedrl.scheduling.buffer import RolloutBuffer
from sortedrl.scheduling.checkpoint_format import CHECKPOINT_FORMAT, upgrade_checkpoint
from sortedrl.scheduling.config import SchedulerConfig
from sortedrl.scheduling.lengths import Lengths, length_tracker, queue_rank
from sortedrl.scheduling.metrics import Ledger
from sortedrl.scheduling.policies import Policy, make_policy
from sortedrl.scheduling.protocol import (
    Generation,
    Request,
    UpdateBatch,
)
from sortedrl.scheduling.rollout_batch import WindowFitRule
from sortedrl.scheduling.state import Group, GroupState, PromptSpec, Seq, SeqState

# Queue priority classes: lower goes first.
_PROTECTED, _RESUME, _ADMITTED = 0, 1, 2


class Controller:
    def __init__(
        self,
        config: SchedulerConfig,
        prompts: Iterable[PromptSpec],
        lengths: Lengths | None = None,
    ) -> None:
        """`lengths`: the length tracker (history, progress, update pacing); by default the
        one `config` asks for, a no-op one when nothing length-aware is on."""
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
        self._lengths: Lengths = lengths if lengths is not None else length_tracker(config)
        # sorted with rollout_batch=auto: the window-fit rule picks R (scheduling/rollout_batch.py).
        self._rule: WindowFitRule | None = None
        if config.adaptive_rollout_batch:
            self._rule = WindowFitRule(
                config.update_batch,
                config.group_size,
                config.staleness_limit or 0,
            )
        # Rounds under a varying R: (round index, prompts admitted into it).
        self._round, self._round_admitted = 0, 0

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
    def rollout_batch(self) -> int:
        """R now: the setting, or the window-fit rule's current choice."""
        if self._rule is not None and self._rule.rollout_batch is not None:
            return self._rule.rollout_batch
        return self.config.effective_rollout_batch

    @property
    def live_admitted(self) -> int:
        return self._admitted - self._dropped_groups

    @property
    def num_queued(self) -> int:
        """Responses waiting in the controller's queue to be submitted."""
        return self._n_queued

    @property
    def requests_submitted(self) -> int:
        """Requests handed to the engine so far: fresh, resumed and regenerated alike."""
        return self._next_request

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
    def requests_to_submit(self, free_slots: int, ahead: int = 0) -> list[Request]:
        """Admit prompts as the policy allows, then hand out up to `free_slots` requests, plus
        up to `ahead` more (an engine that holds them and starts them as its slots free up,
        without a round trip to the driver: the policy may admit for them as for free slots,
        since the engine could start them; sorted's rollout batch still bounds what is open)."""
        if self._rule is not None and self._rule.capacity is None:
            self._rule.set_capacity(free_slots + len(self._running))  # the engine's slots
        if self._in_update is None or not self.colocated:
            spare = free_slots + ahead - self._n_queued
            self._admit(self.policy.prompts_to_admit(self, spare))
        out: list[Request] = []
        while self._queue and len(out) < free_slots + ahead:
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
            group = Group(spec, self._admitted, self._next_round())
            group.seqs = [Seq(group, i) for i in range(cfg.group_size)]
            self._groups[group.order] = group
            self._admitted += 1
            self.ledger.prompts_admitted += 1
            for seq in group.seqs:
                self._enqueue(seq, _ADMITTED)

    def _next_round(self) -> int:
        """The round (rollout batch) the next admitted prompt belongs to."""
        if self._rule is None:
            return self._admitted // self.config.effective_rollout_batch
        if self._round_admitted >= self.rollout_batch:
            self._round, self._round_admitted = self._round + 1, 0
        self._round_admitted += 1
        return self._round

    def _enqueue(self, seq: Seq, priority: int, rank: float | None = None) -> None:
        if seq.group.protected:
            priority = _PROTECTED
        if seq.state is not SeqState.QUEUED or seq.ticket < 0:  # not yet counted as queued
            self._n_queued += 1
        seq.state = SeqState.QUEUED
        seq.ticket = self._tickets  # any older entry of this seq is now dead
        if rank is None:
            rank = queue_rank(self.config, self._lengths, seq)
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
            self._lengths.record(seq.group.spec.history_key, gen.n_tokens)
            if self.buffer.add_finished(seq):
                if self._rule is not None:
                    self._rule.group_completed(
                        seq.group.order, [s.n_tokens for s in seq.group.seqs]
                    )
                self._on_group_complete(seq.group)

    def _take_running(self, gen: Generation) -> Seq:
        seq = self._running.pop(gen.request_id, None)
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
    def update_due(self) -> bool:
        """True when an update should start now (the run loop also waits for a busy trainer)."""
        if self._in_update is not None:
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
            return not (self.config.paces_updates and self._pacing_holds())
        # End of data: train what is left rather than lose it.
        return self.exhausted and complete == len(self._groups)

    def take_update_batch(self) -> UpdateBatch:
        """The groups the next update trains: protected groups first, then by the version of
        their oldest token (oldest first: the closest to the staleness limit), then in
        completion order (short before long among groups of one version). The engine must
        have been paused first when the policy is colocated."""
        assert self._in_update is None, "an update is already in progress"
        self._lengths.new_update()
        candidates = self.buffer.complete_groups()
        candidates.sort(key=lambda g: (not g.protected, g.oldest_version, g.completed_seq))
        # At most update_batch groups are protected at once, so all of them fit here.
        chosen = candidates[: self.config.update_batch]
        self.buffer.pop_groups(chosen)
        self._in_update = chosen
        return UpdateBatch(self._version, [g.train_group() for g in chosen])

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
        to_abort = self._enforce_staleness()
        if self._rule is not None and self._rule.rollout_batch is not None:
            oldest = next(
                (g.order for g in self._groups.values() if g.state is GroupState.ACTIVE),
                self._admitted,
            )
            self._rule.admitted_through(oldest)
            self._rule.decide()
        return to_abort

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

    # --- checkpoints --------------------------------------------------------------------------
    # The whole state as plain JSON-able data (no pickle), taken between updates with nothing
    # running in the engine (pause it first). Groups are named by admission order.

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to go on exactly from here; raises if the engine still runs
        responses or an update is in progress."""
        if self._running:
            raise RuntimeError("checkpoint with responses still in the engine: pause it first")
        if self._in_update is not None:
            raise RuntimeError("checkpoint during an update")
        live = (e for e in self._queue if e[3].ticket == e[2] and e[3].state is SeqState.QUEUED)
        return {
            "format": CHECKPOINT_FORMAT,
            "config": self.config.model_dump(),
            "version": self._version,
            "admitted": self._admitted,
            "dropped_groups": self._dropped_groups,
            "next_request": self._next_request,
            "groups": [g.state_dict() for g in self._groups.values()],
            "queue": [[p, s.group.order, s.index, r] for p, r, _, s in sorted(live)],
            **self.buffer.state_dict(),
            "protect_waitlist": [g.order for g in self._protect_waitlist if g.open],
            "ledger": self.ledger.state_dict(),
            "lengths": self._lengths.state_dict(),
            "rollout_batch_rule": None if self._rule is None else self._rule.state_dict(),
            "round": [self._round, self._round_admitted],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Go on from `state` (see `state_dict`). Call it on a fresh controller built with the
        same config and the same prompt source; the prompts it had admitted are skipped."""
        state = upgrade_checkpoint(state)  # raises on a format it does not know
        if self._admitted or self._tickets:
            raise RuntimeError("load_state_dict needs a controller that has not started")
        diff = self.config.differences(state["config"])
        if diff:
            raise ValueError(f"scheduler settings differ from the checkpoint's: {diff}")
        for _ in range(state["admitted"]):
            if self._next_spec is None:
                raise ValueError("the prompt source is shorter than what the checkpoint admitted")
            self._next_spec = next(self._prompts, None)
        self._version = state["version"]
        self._admitted = state["admitted"]
        self._dropped_groups = state["dropped_groups"]
        self._next_request = state["next_request"]
        for gs in state["groups"]:
            group = Group.from_state_dict(gs)
            self._groups[group.order] = group
            self._n_protected += group.protected
        groups = self._groups
        self.buffer.load_state_dict(state, groups)
        if state["lengths"] is not None:
            self._lengths.load_state_dict(state["lengths"])  # before the queue: ranks use it
        for priority, order, index, rank in state["queue"]:
            self._enqueue(groups[order].seqs[index], priority, rank)
        self._protect_waitlist.extend(groups[o] for o in state["protect_waitlist"])
        self.ledger.load_state_dict(state["ledger"])
        if self._rule is not None:
            rule_state = state["rollout_batch_rule"]
            if rule_state is None:
                raise ValueError(
                    "the checkpoint has no rollout batch rule state, but rollout_batch is auto"
                )
            self._rule.load_state_dict(rule_state)
        self._round, self._round_admitted = state["round"]

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
        self._lengths.forget_running()
        for seq in lost:
            self._enqueue(seq, _RESUME)
        return len(lost)

    # --- length-aware scheduling: see scheduling/lengths.py ----------------------------------
    def observe_step(
        self, tokens_generated: int, busy_slot_s: float, elapsed_s: float, capacity: int
    ) -> None:
        """An engine step's report (what the length tracker estimates progress from)."""
        self._lengths.observe_step(tokens_generated, busy_slot_s, elapsed_s, capacity)

    def _pacing_holds(self) -> bool:
        groups, running = list(self._groups.values()), list(self._running.values())
        return self._lengths.pacing_holds(
            self.config,
            self._version,
            groups,
            running,
            self._n_queued,
            self.exhausted,
            self.rollout_batch,
        )
