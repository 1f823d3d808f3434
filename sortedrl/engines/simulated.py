"""A rollout engine in virtual time, driven by the roofline cost model.

Model of the engine (what a vLLM deployment with data-parallel replicas does):

- `gpus // tp` replicas, each an independent continuous-batching engine with at most
  `max_num_seqs` running sequences and a KV cache of `kv_capacity_tokens` tokens.
- One FIFO waiting queue. A request starts on a replica at one of that replica's step
  boundaries when the replica has a free slot and KV room for the prompt, the resumed prefix,
  one more token for every running sequence and a watermark (1% of the cache, as vLLM V0);
  among replicas free at the same moment the least loaded wins. A started request is prefilled (prompt + resumed tokens); the prefill
  time is added to that replica's next step.
- Every decode step adds one token to each running sequence. Before a step, if the KV cache
  cannot hold the next token of every running sequence, the most recently started sequence
  is preempted to the front of the queue keeping its progress (vLLM's recompute
  preemption: it is prefilled again when it restarts).

Replicas run independently, each on its own clock (not in lockstep): real data-parallel
replicas do not wait for each other, and this keeps the accounting exact while making each
event O(log n). A replica's state is only materialised at its own events (a sequence
finishing, a preemption due, a queued request it can take, or `max_event_steps` steps);
between events its step times follow in closed form from the cost model
(`CostModel.decode_steps_time`). `step()` advances the engine clock to the earliest event of
any replica. Consequences worth knowing:

- `busy_slot_s` is exact: the number of running sequences only changes at events.
- `tokens_generated` of a replica is credited at that replica's events, so a report may
  include tokens another replica produced a little earlier; sums over a run are exact.
- `abort` of a running request lets its replica finish the step in progress (the partial
  includes that step's token); `pause` stops at the last completed step of each replica, the
  step in progress is lost (its time counted as busy). Tokens credited by `pause` appear in
  the next `step()` report.
- A weight update reaches each replica at its next step boundary; tokens of the step in
  progress carry the old version.

The engine has no randomness: lengths come from the workload, which is seeded.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Sequence
from typing import Any

from sortedrl.engines.costmodel import ClusterSpec, CostModel, resolve_preset
from sortedrl.engines.simulated_replica import DONE, EPS, RUNNING, WAITING, Replica, SimSeq
from sortedrl.errors import ConfigError
from sortedrl.scheduling.protocol import (
    EngineBase,
    FinishReason,
    Generation,
    Request,
    StepReport,
)
from sortedrl.workload import LengthModel


class SimulatedEngine(EngineBase):
    """Implements `sortedrl.scheduling.protocol.Engine` in virtual time.

    `gpus` overrides the preset's GPU count (an async run gives rollout a subset);
    `max_event_steps` bounds how many decode steps a replica runs between reports.
    """

    def __init__(
        self,
        preset: str | ClusterSpec,
        workload: LengthModel,
        gpus: int | None = None,
        max_event_steps: int = 4096,
        kv_watermark: float = 0.01,
        version: int = 0,
    ):
        spec = resolve_preset(preset)
        self.cost = CostModel(spec, gpus=gpus)
        self.spec = self.cost.spec
        self.workload = workload
        if max_event_steps < 1:
            raise ConfigError(f"max_event_steps must be >= 1, got {max_event_steps}")
        self.max_event_steps = max_event_steps
        self._kv_cap = self.cost.kv_capacity_tokens
        self._max_seqs = self.spec.max_num_seqs
        if not 0 <= kv_watermark < 1:
            raise ConfigError(f"kv_watermark must be in [0, 1), got {kv_watermark}")
        # Admission keeps this many KV tokens free (vLLM V0's 1% watermark): without it a
        # KV-bound replica admits, then preempts, the same request at almost every finish.
        self._watermark = int(self._kv_cap * kv_watermark)
        self._version = version
        self._reps = [
            Replica(i, version, self.cost.decode_steps_time) for i in range(self.cost.replicas)
        ]
        self._now = 0.0
        self._queue: deque[SimSeq] = deque()
        self._n_waiting = 0
        # Set when the queue head may have changed: only then can a replica that refused the
        # old head take the new one outside its own events.
        self._head_changed = False
        self._seqs: dict[str, SimSeq] = {}  # waiting and running, by request id
        self._ready: list[Generation] = []  # finished without decoding, for the next step()
        self._events: list[tuple[float, int, int, int]] = []  # (time, tiebreak, replica, ev)
        # Replicas whose next event must be recomputed before time advances. Deferring it
        # lets a finish and the controller's follow-up submit share one computation.
        self._dirty: list[Replica] = []
        pf = self.cost.spec.accelerator.prefill_mfu * self.cost.spec.accelerator.flops_per_s
        m = self.spec.model
        self._pf_lin = 2.0 * m.params / (self.cost.tp * pf)  # prefill s/token (cost model)
        self._pf_quad = m.attn_flops_coef / 2.0 / (self.cost.tp * pf)
        self._decode_time = self.cost.decode_steps_time
        self._tiebreak = 0
        self._order = 0
        self._running = 0
        self._tokens = 0  # credited, not yet reported
        self._prefill = 0
        #: Cumulative counters, for reports and tests.
        self.preemptions = 0
        self.total_tokens = 0
        self.total_prefill_tokens = 0

    # --- protocol ---------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return self.cost.capacity

    @property
    def version(self) -> int:
        return self._version

    @property
    def now(self) -> float:
        """The engine's virtual clock (seconds since construction)."""
        return self._now

    def num_unfinished(self) -> int:
        return len(self._seqs) + len(self._ready)

    # --- read-only views, for reports and tests -------------------------------------------------

    @property
    def replicas(self) -> tuple[Replica, ...]:
        return tuple(self._reps)

    @property
    def num_running(self) -> int:
        return self._running

    @property
    def num_waiting(self) -> int:
        """Requests queued inside the engine, not yet started on a replica."""
        return self._n_waiting

    def request_ids(self, state: str | None = None) -> list[str]:
        """Ids of requests inside the engine: all, or only `running` or `waiting` ones."""
        want = {None: None, "running": RUNNING, "waiting": WAITING}[state]
        return [rid for rid, q in self._seqs.items() if want is None or q.state == want]

    def submit(self, requests: Sequence[Request]) -> None:
        # Validate the whole batch first, so a bad request leaves the engine unchanged.
        cap_resp = min(self.spec.response_cap, self.workload.cap)
        new: list[SimSeq] = []
        ready: list[Generation] = []
        ids: set[str] = set()
        for req in requests:
            rid = req.request_id
            if rid in self._seqs or rid in ids:
                raise ValueError(f"request id {rid!r} is already in the engine")
            ids.add(rid)
            cap = min(req.max_new_tokens, cap_resp)
            if req.prompt_len < 0:
                raise ValueError(f"request {rid!r}: negative prompt_len")
            if req.prompt_len + cap + 1 > self._kv_cap:
                raise ConfigError(
                    f"request {rid!r}: prompt ({req.prompt_len}) + response cap ({cap}) "
                    f"exceeds the KV cache of one replica ({self._kv_cap} tokens) of preset "
                    f"'{self.spec.name}'"
                )
            natural = self.workload.length(req.prompt_id, req.sample_index, req.attempt, req.epoch)
            final = min(natural, cap)
            reason: FinishReason = "length" if natural >= cap else "stop"
            q = SimSeq(rid, req.prompt_len, final, reason)
            if req.resume is not None:
                q.prefix = req.resume.n_tokens
                q.spans = list(req.resume.version_spans)
            if q.prefix >= q.final:
                # Nothing left to generate (e.g. a partial cut exactly at its end).
                fin: FinishReason = "length" if q.prefix >= cap else q.reason
                ready.append(Generation(rid, fin, q.prefix, q.spans))
            else:
                new.append(q)
        self._ready += ready
        if not new:
            return
        if not self._n_waiting:
            self._head_changed = True
        for q in new:
            self._seqs[q.rid] = q
        self._queue.extend(new)
        self._n_waiting += len(new)
        self._dispatch()

    def step(self) -> StepReport:
        report = StepReport()
        if self._ready:
            report.finished, self._ready = self._ready, []
        if self._dirty:
            self._flush()
        events, reps = self._events, self._reps
        advanced = False
        # Process the earliest event, and every other event at that same moment.
        while events:
            t, _, ri, ev = events[0]
            r = reps[ri]
            if ev != r.ev:
                heapq.heappop(events)  # superseded by a later schedule of that replica
                continue
            if advanced and t > self._now:
                break
            heapq.heappop(events)
            dt = t - self._now
            if dt > 0:
                report.elapsed_s += dt
                report.busy_slot_s += self._running * dt
                self._now = t
            self._at_event(r, t, report.finished)
            advanced = True
        report.tokens_generated, self._tokens = self._tokens, 0
        report.prefill_tokens, self._prefill = self._prefill, 0
        return report

    def abort(self, request_ids: Sequence[str]) -> list[Generation]:
        out: list[Generation] = []
        touched: dict[int, Replica] = {}
        for rid in request_ids:
            q = self._seqs.pop(rid, None)
            if q is None:
                # Finished but not yet returned by step(): it is aborted all the same.
                for i, g in enumerate(self._ready):
                    if g.request_id == rid:
                        del self._ready[i]
                        out.append(Generation(rid, "abort", g.n_tokens, g.version_spans))
                        break
                continue
            if q.state == WAITING:
                q.state = DONE
                self._n_waiting -= 1
                self._head_changed = True
                out.append(Generation(rid, "abort", q.prefix, list(q.spans)))
                continue
            r = q.rep
            assert r is not None
            if r.t < self._now - EPS:
                # Let the step in progress complete: the replica's state stays exact.
                k = r.ceil_steps(self._now)
                self._advance(r, k, r.t + r.pre + self.cost.decode_steps_time(r.n, r.kv, k))
            out.append(self._stop(r, q, "abort"))
            touched[r.idx] = r
        for r in touched.values():
            self._fill(r)
            self._touch(r)
        self._head_changed = True
        self._wake_others(None)
        return out

    def pause(self) -> list[Generation]:
        out: list[Generation] = []
        cost = self.cost
        for r in self._reps:
            if r.n:
                if r.t < self._now - EPS:
                    k = r.floor_steps(self._now)
                    if k:
                        self._advance(r, k, r.t + r.pre + cost.decode_steps_time(r.n, r.kv, k))
                    r.busy_slot_s += r.n * max(0.0, self._now - r.t)  # the step dropped
                for order, q in r.stack:
                    if q.order == order and q.state == RUNNING:
                        out.append(self._stop(r, q, "abort"))
            # A weight update due at the dropped step's end applies from here on.
            r.mark(r.s, self._version)
            r.heap.clear()
            r.stack.clear()
            r.n, r.kv, r.pre, r.wake = 0, 0, 0.0, None
            r.t = max(r.t, self._now)
            r.ev += 1
        for q in self._queue:
            if q.state == WAITING:
                q.state = DONE
                out.append(Generation(q.rid, "abort", q.prefix, list(q.spans)))
        for g in self._ready:
            out.append(Generation(g.request_id, "abort", g.n_tokens, g.version_spans))
        self._ready = []
        self._queue.clear()
        self._seqs.clear()
        self._n_waiting = 0
        self._running = 0
        self._events.clear()
        for r in self._dirty:
            r.dirty = False
        self._dirty.clear()
        return out

    def load_weights(self, weights: Any, version: int) -> float:
        self._version = version
        for r in self._reps:
            # Steps after boundary m use the new weights; the step in progress keeps the old.
            m = r.s
            if r.n and r.t < self._now - EPS:
                m += r.ceil_steps(self._now)
            r.mark(m, version)
        return self.cost.weight_sync_time()

    # --- internals --------------------------------------------------------------------------

    def _advance(self, r: Replica, k: int, t: float) -> None:
        """Move replica `r` forward `k` decode steps, to boundary time `t`."""
        if k <= 0:
            return
        r.busy_slot_s += r.n * (t - r.t)
        r.t = t
        r.s += k
        r.kv += r.n * k
        r.pre = 0.0
        new = r.n * k
        self._tokens += new
        self.total_tokens += new

    def _at_event(self, r: Replica, t: float, finished: list[Generation]) -> None:
        self._advance(r, r.ev_step - r.s, t)
        r.wake = None
        heap = r.heap
        while heap and heap[0][0] <= r.s:
            _, order, q = heapq.heappop(heap)
            if q.order == order and q.state == RUNNING:
                finished.append(self._stop(r, q, q.reason))
        if r.n and r.kv + r.n > self._kv_cap:
            self._preempt(r)
        self._fill(r)
        self._touch(r)
        if self._n_waiting:
            self._wake_others(r)

    def _stop(self, r: Replica, q: SimSeq, reason: FinishReason) -> Generation:
        """Remove running `q` from `r` at r's current boundary and report it."""
        n_tokens = q.prefix + (r.s - q.start)
        spans = q.spans
        r.run_spans(q.start, r.s, spans)
        r.n -= 1
        r.kv -= q.prompt_len + n_tokens
        self._running -= 1
        q.state = DONE
        self._seqs.pop(q.rid, None)
        return Generation(q.rid, reason, n_tokens, spans)

    def _preempt(self, r: Replica) -> None:
        stack = r.stack
        while r.n and r.kv + r.n > self._kv_cap:
            order, q = stack.pop()
            if q.order != order or q.state != RUNNING:
                continue
            toks = q.prefix + (r.s - q.start)
            r.run_spans(q.start, r.s, q.spans)
            r.n -= 1
            r.kv -= q.prompt_len + toks
            self._running -= 1
            q.prefix = toks
            q.state = WAITING
            q.order = -1  # invalidates its heap entry
            self._queue.appendleft(q)
            self._n_waiting += 1
            self._head_changed = True
            self.preemptions += 1

    def _head(self) -> SimSeq | None:
        q = self._queue
        while q and q[0].state != WAITING:
            q.popleft()
        return q[0] if q else None

    def _room(self, q: SimSeq) -> int:
        """KV tokens a replica needs, beyond what it holds and its running sequences' next
        tokens, to start `q`."""
        return q.prompt_len + q.prefix + 1 + self._watermark

    def _start(self, r: Replica, q: SimSeq) -> None:
        """Start waiting `q` (the queue head) on `r` at r's current boundary."""
        self._queue.popleft()
        self._n_waiting -= 1
        self._head_changed = True
        if r.n == 0:
            # An idle replica has no step in progress: it starts now.
            if r.t < self._now:
                r.t = self._now
            r.pre = 0.0
        need = q.prompt_len + q.prefix
        q.state = RUNNING
        q.rep = r
        q.start = r.s
        self._order += 1
        q.order = order = self._order
        heapq.heappush(r.heap, (r.s + q.final - q.prefix, order, q))
        r.stack.append((order, q))
        r.n += 1
        r.kv += need
        r.pre += need * (self._pf_lin + self._pf_quad * need)  # CostModel.prefill_time
        self._running += 1
        self._prefill += need
        self.total_prefill_tokens += need
        if len(r.stack) > 2 * r.n + 64:
            r.stack = [(o, s) for o, s in r.stack if s.order == o and s.state == RUNNING]

    def _fill(self, r: Replica) -> None:
        """Start queued requests on `r` (at its current boundary) while they fit, in order."""
        cap, max_seqs = self._kv_cap, self._max_seqs
        while self._n_waiting and r.n < max_seqs:
            q = self._head()
            if q is None or r.kv + r.n + self._room(q) > cap:
                return
            self._start(r, q)

    def _touch(self, r: Replica) -> None:
        if not r.dirty:
            r.dirty = True
            self._dirty.append(r)

    def _flush(self) -> None:
        for r in self._dirty:
            r.dirty = False
            self._schedule(r)
        self._dirty.clear()

    def _schedule(self, r: Replica) -> None:
        """Compute and post r's next event."""
        r.ev += 1
        if r.n == 0:
            r.wake = None
            return
        heap = r.heap
        while heap[0][1] != heap[0][2].order or heap[0][2].state != RUNNING:
            heapq.heappop(heap)  # stale: preempted or aborted
        s_e = heap[0][0]
        free = self._kv_cap - r.kv - r.n
        s_e = min(s_e, r.s + free // r.n + 1 if free >= 0 else r.s, r.s + self.max_event_steps)
        if r.wake is not None and r.wake < s_e:
            s_e = r.wake
        k = s_e - r.s
        t = r.t + r.pre + self._decode_time(r.n, r.kv, k) if k > 0 else r.t
        r.ev_step = s_e
        self._tiebreak += 1
        heapq.heappush(self._events, (t, self._tiebreak, r.idx, r.ev))

    def _dispatch(self) -> None:
        """Start queued requests on replicas that are at a boundary now, least loaded first."""
        if not self._head_changed:
            return  # the head is one every replica has already refused or been woken for
        cap, max_seqs, now = self._kv_cap, self._max_seqs, self._now - EPS
        reps = self._reps
        while self._n_waiting:
            q = self._head()
            if q is None:
                break
            room = self._room(q)
            best = None
            for r in reps:
                if r.n >= max_seqs or r.kv + r.n + room > cap or (r.n and r.t < now):
                    continue  # full, or in mid-step
                if best is None or r.n < best.n or (r.n == best.n and r.kv < best.kv):
                    best = r
            if best is None:
                break
            self._start(best, q)
            self._touch(best)
        self._wake_others(None)

    def _wake_others(self, skip: Replica | None) -> None:
        """Replicas in mid-step that could take a new queue head do so at their next boundary.

        A replica that cannot take the head now cannot until its own next event (its KV only
        grows in between), where it tries again itself; so this pass is needed only when the
        head changes.
        """
        cap, max_seqs, now = self._kv_cap, self._max_seqs, self._now - EPS
        while self._head_changed:
            self._head_changed = False
            q = self._head()
            if q is None:
                return
            room = self._room(q)
            for r in self._reps:
                if r.wake is not None or r.n >= max_seqs or r.kv + r.n + room > cap:
                    continue
                if r is skip:
                    continue
                if r.n == 0 or r.t >= now:
                    self._fill(r)  # at a boundary: start now
                    self._touch(r)
                    if self._head_changed:
                        break  # a new head: look at every replica again
                    continue
                w = r.s + r.ceil_steps(self._now)
                if w < r.ev_step:
                    r.wake = w
                    self._touch(r)
