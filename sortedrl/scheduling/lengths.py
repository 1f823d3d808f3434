"""Length history, prediction and update pacing for the `sorted` policy (pure Python).

`LengthTracker` is what the controller holds when a length-aware setting is on
(`SchedulerConfig.uses_length_history`); its state goes into the controller checkpoint.

`LengthHistory` keeps the most recent finished lengths of each prompt, keyed on its data
record (`PromptSpec.history_key`), over epochs and over the siblings of the group in flight,
and predicts how long a response runs given how far it has got: the mean of the prompt's
recorded lengths that exceed its progress (lengths are heavy-tailed, so a response that
outlived the short ones is predicted among the long ones).
A prompt with no record borrows the same estimate from every length seen so far.

`plan_wait` is the update-pacing decision (`SchedulerConfig.update_pacing`). Its cost model,
in slot-steps (one engine slot for one decode step; a generated token costs one):

- restarting a group the update pushes past the staleness bound costs the tokens it holds
  (they are discarded and must be generated again);
- waiting W decode steps before the update costs the engine slots left idle meanwhile: as
  the responses running now finish (at their predicted remaining lengths) their slots free,
  and only the work the controller can still hand out (queued responses, and prompts the
  policy may still admit) refills them.

Waiting for the groups predicted to complete first saves their tokens; the plan picks the
wait that saves the most net of its cost, or none when no wait pays for itself. Not counted:
groups that complete during the wait beyond what the update trains wait for later updates,
which then come sooner, and may go stale themselves.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection, Iterable, Sequence
from typing import Any

from sortedrl.scheduling.config import SchedulerConfig
from sortedrl.scheduling.state import Group, GroupState, Seq, SeqState

# Most recent lengths kept per prompt: enough for a few epochs of a group of 8.
HISTORY_WINDOW = 32


class LengthHistory:
    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._by_prompt: dict[str, deque[int]] = {}
        self._all: deque[int] = deque(maxlen=4096)  # recent lengths of every prompt

    def record(self, key: str, length: int) -> None:
        """A finished response of the prompt whose history key (its record) is `key`."""
        hist = self._by_prompt.get(key)
        if hist is None:
            hist = self._by_prompt[key] = deque(maxlen=HISTORY_WINDOW)
        hist.append(length)
        self._all.append(length)

    def known(self, key: str) -> int:
        """How many lengths of this record are kept."""
        hist = self._by_prompt.get(key)
        return len(hist) if hist else 0

    def predict(self, key: str, progress: float = 0.0) -> float:
        """Predicted total length of a response of this record that has `progress` tokens."""
        hist = self._by_prompt.get(key) or self._all
        longer = [x for x in hist if x > progress]
        if longer:
            return sum(longer) / len(longer)
        if not hist:
            return float(self.cap)  # nothing seen yet: assume the worst
        # Longer than anything on record: assume it runs as long again, up to the cap.
        return min(float(self.cap), max(progress + 1.0, 2.0 * progress))

    def state_dict(self) -> dict[str, Any]:
        return {
            "by_prompt": {p: list(h) for p, h in self._by_prompt.items()},
            "all": list(self._all),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._by_prompt = {
            p: deque((int(x) for x in h), maxlen=HISTORY_WINDOW)
            for p, h in state["by_prompt"].items()
        }
        self._all = deque((int(x) for x in state["all"]), maxlen=self._all.maxlen)


def plan_wait(
    at_risk: Sequence[tuple[float, float]],
    running_remaining: Sequence[float],
    capacity: int,
    refill: int,
    max_groups: int,
) -> tuple[float, int] | None:
    """How long to hold an update back, by the cost model of the module docstring.

    `at_risk`: (predicted decode steps until the group is complete, tokens it holds) for each
    group the update would push past the bound; `running_remaining`: predicted remaining
    steps of every response running now; `refill`: responses that could take a freed slot;
    `max_groups`: how many saved groups the update can train. Returns (steps to wait,
    groups it saves), or None when waiting does not pay.
    """
    if not at_risk or capacity <= 0 or max_groups <= 0:
        return None
    finishes = sorted(running_remaining)
    busy0 = len(finishes)
    best: tuple[float, float, int] | None = None  # (net gain, wait, groups)
    saved = 0.0
    idle_cost, t_prev, k = 0.0, 0.0, 0  # k: running responses finished by t_prev
    for n, (wait, held) in enumerate(sorted(at_risk)[:max_groups], start=1):
        # Idle slot-steps between t_prev and `wait`, piecewise over the finishes.
        while t_prev < wait:
            t_next = finishes[k] if k < len(finishes) and finishes[k] < wait else wait
            idle = max(0, capacity - min(capacity, busy0 - k + refill))
            idle_cost += idle * (t_next - t_prev)
            t_prev = t_next
            while k < len(finishes) and finishes[k] <= t_prev:
                k += 1
        saved += held
        gain = saved - idle_cost
        if gain > 0 and (best is None or gain > best[0]):
            best = (gain, wait, n)
    return None if best is None else (best[1], best[2])


class LengthTracker:
    """The controller's length-aware state: the history, an estimate of each running
    response's progress, and the update-pacing wait in progress.

    Progress: every running response gains one token per decode step, so an engine step's
    tokens over its mean occupancy advances a count of decode steps run; a running response
    holds its resumed prefix plus the steps run since it was submitted (the controller sees
    its tokens only when it returns).
    """

    def __init__(self, cap: int) -> None:
        self.history = LengthHistory(cap)
        self.steps = 0.0  # decode steps the engine has run, estimated from its reports
        self.capacity = 0  # engine capacity, from the reports
        self.occupancy = 0.0  # sequences the engine actually ran in its last step
        self._submitted_at: dict[str, float] = {}  # request_id -> steps at submission
        self._pace: tuple[float, list[Group]] | None = None  # (deadline, groups waited for)
        self._pace_decided = False  # this update's pacing decision is made

    # --- progress ---------------------------------------------------------------------------
    def observe_step(
        self, tokens_generated: int, busy_slot_s: float, elapsed_s: float, capacity: int
    ) -> None:
        self.capacity = capacity
        if elapsed_s > 0 and busy_slot_s > 0:
            self.steps += tokens_generated * elapsed_s / busy_slot_s
            self.occupancy = busy_slot_s / elapsed_s

    def submitted(self, request_id: str) -> None:
        self._submitted_at[request_id] = self.steps

    def record(self, history_key: str, n_tokens: int) -> None:
        """A response of the prompt (or record) `history_key` finished with `n_tokens`."""
        self.history.record(history_key, n_tokens)

    def returned(self, request_id: str) -> None:
        self._submitted_at.pop(request_id, None)

    def forget_running(self) -> None:
        """The engine died; what it ran is requeued."""
        self._submitted_at.clear()

    def progress(self, seq: Seq) -> float:
        """Tokens a response holds: estimated for a running one, known for the rest."""
        rid = seq.request_id
        if seq.state is SeqState.GENERATING and rid in self._submitted_at:
            return seq.submitted_prefix + self.steps - self._submitted_at[rid]
        return float(seq.n_tokens)

    def remaining(self, seq: Seq, progress: float) -> float:
        return max(0.0, self.history.predict(seq.group.spec.history_key, progress) - progress)

    def rank(self, seq: Seq) -> float:
        """Queue order for `submit_order=longest_predicted` (lower first)."""
        return -self.remaining(seq, seq.n_tokens)

    # --- update pacing ----------------------------------------------------------------------
    def new_update(self) -> None:
        self._pace, self._pace_decided = None, False

    def pacing_holds(
        self,
        config: SchedulerConfig,
        version: int,
        groups: Collection[Group],
        running: Collection[Seq],
        queued: int,
        exhausted: bool,
        rollout_batch: int,
    ) -> bool:
        """True while a planned wait before the due update is still worth it. One plan per
        update (`plan_wait`); the wait ends at its deadline or when the groups it waits for
        are complete, whichever comes first. `groups`: the open groups; `queued`: responses
        in the controller's queue; `exhausted`: no prompt is left to admit; `rollout_batch`: the
        R admission keeps open now."""
        if not running:
            return False
        # Responses that could take a freed slot: queued, or of prompts admission may add.
        refill = queued
        if config.effective_admission == "fill" and not exhausted:
            refill += max(0, rollout_batch - len(groups)) * config.group_size
        if self._pace is None:
            if self._pace_decided:
                return False
            self._pace_decided = True
            self._pace = self._plan(config, version, groups, running, refill)
            if self._pace is None:
                return False
        deadline, targets = self._pace
        if self.steps >= deadline or all(g.state is not GroupState.ACTIVE for g in targets):
            self._pace = None
            return False
        return True

    def _plan(
        self,
        config: SchedulerConfig,
        version: int,
        groups: Iterable[Group],
        running: Collection[Seq],
        refill: int,
    ) -> tuple[float, list[Group]] | None:
        limit = config.staleness_limit
        assert limit is not None  # update_pacing is for sorted, always bounded
        at_risk: list[tuple[float, float, Group]] = []  # (steps to complete, tokens held, group)
        room = config.update_batch  # the update trains complete groups oldest first:
        for group in groups:
            versions = [v for v in (s.oldest_version for s in group.seqs) if v is not None]
            if not versions or version + 1 - min(versions) <= limit:
                continue
            if group.state is not GroupState.ACTIVE:
                room -= 1  # a complete group at risk goes ahead of any group saved by waiting
                continue
            held, wait = 0.0, 0.0
            for seq in group.seqs:
                progress = self.progress(seq)
                held += progress
                if seq.state is not SeqState.FINISHED:
                    wait = max(wait, self.remaining(seq, progress))
            at_risk.append((wait, held, group))
        ahead = [self.remaining(q, self.progress(q)) for q in running]
        # A KV-bound engine runs fewer than its capacity; what it ran last is what it can run.
        usable = min(self.capacity, max(1, round(self.occupancy)))
        plan = plan_wait([(w, h) for w, h, _ in at_risk], ahead, usable, refill, room)
        if plan is None:
            return None
        wait, n = plan
        at_risk.sort(key=lambda x: (x[0], x[1], x[2].order))
        return self.steps + wait, [g for _, _, g in at_risk[:n]]

    # --- checkpoint -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Taken between updates, with nothing running and no wait planned."""
        return {"steps": self.steps, "history": self.history.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = float(state["steps"])
        if state.get("history") is not None:
            self.history.load_state_dict(state["history"])


class NoLengthTracker:
    """The length tracker of a controller with nothing length-aware on: it keeps no history
    and never holds an update back, so the controller calls it without asking whether it has
    one."""

    def observe_step(
        self, tokens_generated: int, busy_slot_s: float, elapsed_s: float, capacity: int
    ) -> None:
        pass

    def submitted(self, request_id: str) -> None:
        pass

    def returned(self, request_id: str) -> None:
        pass

    def record(self, history_key: str, n_tokens: int) -> None:
        pass

    def forget_running(self) -> None:
        pass

    def rank(self, seq: Seq) -> float:
        return 0.0

    def new_update(self) -> None:
        pass

    def pacing_holds(
        self,
        config: SchedulerConfig,
        version: int,
        groups: Collection[Group],
        running: Collection[Seq],
        queued: int,
        exhausted: bool,
        rollout_batch: int,
    ) -> bool:
        return False

    def state_dict(self) -> None:
        return None  # the checkpoint's `lengths` is null, as it always was without a history

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass  # a history these settings do not use is not needed


Lengths = LengthTracker | NoLengthTracker


def length_tracker(config: SchedulerConfig) -> Lengths:
    """The tracker `config` asks for: a length history when a length-aware setting is on."""
    return LengthTracker(config.max_new_tokens) if config.uses_length_history else NoLengthTracker()


def queue_rank(config: SchedulerConfig, tracker: Lengths, seq: Seq) -> float:
    """A response's place within its priority class of the controller's queue (lower first):
    0 for all under `submit_order=fifo`, so admission order decides."""
    if config.submit_order == "fifo":
        return 0.0
    return tracker.rank(seq)
