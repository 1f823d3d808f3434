"""N engine replicas (Ray actors) presented to the controller as one `Engine`.

`ReplicaPool` keeps the controller unchanged: its capacity is the sum of the replicas'.

Routing: submitted requests wait in the pool in submission order and go, as room frees up, to
the replica with room that is least loaded (unfinished requests relative to its capacity; the
lower index on a tie). A replica has room for its capacity plus `backlog` requests: the loop
hands the pool up to `backlog` per replica beyond its free slots (`submit_ahead`, drawn from
the prompts the controller already admitted), and a replica starts them itself as its slots
free up, without waiting for the driver to hear of the completion and send a new request. A
backlog request is held by the pool as any routed one: abort, pause and a restart return it
as it was submitted (unstarted), once. The simulated engine routes the same way (one queue, a
request starts on a free replica, the least loaded first); it also checks KV room, which a
transformers replica does not have to.

The replicas run by themselves (`sortedrl.cluster.replica_actor`): each steps its engine
while it has work, and the driver hears from it when something finishes. Each replica with
work has at most one `poll` in flight, which carries the requests routed to it since the last
one and returns what finished (at the first completion, after its first step when it starts
from idle or a hold, or after `report_s`, a heartbeat with its busy time). `step()` sends a
poll to every working replica without one, waits for at least one, collects every one that
is ready and returns one merged report; the others stay in flight across calls. `settle()`
holds every replica (the step in progress completes, no other starts) and collects all it
finished, so that nothing finishes behind the controller's back when it decides on an update
(the run loop calls it); the next `step()` lets them go on. `abort`, `pause` and
`load_weights` settle first too; what finished meanwhile is held and returned by the next
`step()`/`settle()`. Time is the replicas' own: see `sortedrl.cluster.pool_clock`.

`per_step=True` is the protocol before this one, kept as the control-plane benchmark's
baseline: one engine step per poll, the engine idle while the driver turns it around.

Weights: `load_weights` puts the state dict into the object store once (an `ObjectRef` is used
as it is) and every replica loads that one object, concurrently (`weight_sync="object_store"`),
or replica 0 loads it and broadcasts it tensor by tensor to the others over their own process
group (`weight_sync="broadcast"`: NCCL between GPUs, gloo on the CPU).

Faults: a replica whose call raises a Ray error (the actor died, or its engine failed) is
killed and started again in its placement bundle, loads the current weights and gets back the
requests it held, as they were submitted (tokens it generated since were never returned, so
never counted; responses it finished and had not delivered are generated again, once). The
controller never sees it. At the `max_engine_failures`-th failure of one replica in a row the
pool raises `ReplicaPoolError`.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from sortedrl.cluster.pool_clock import PoolClock
from sortedrl.errors import SortedRLError
from sortedrl.scheduling.protocol import EngineBase, Generation, Request, StepReport

if TYPE_CHECKING:
    from sortedrl.cluster.placement import Placement
    from sortedrl.cluster.settings import RunSettings
    from sortedrl.tasks.base import Problem

WeightSync = Literal["object_store", "broadcast"]


class ReplicaPoolError(SortedRLError):
    """A replica kept failing after restarts."""


@dataclass
class _Replica:
    """One replica as the pool sees it."""

    index: int
    actor: Any
    capacity: int
    held: dict[str, Request] = field(default_factory=dict)  # sent or routed, not returned
    outbox: list[Request] = field(default_factory=list)  # routed, goes with the next poll
    poll_ref: Any = None  # the poll in flight
    launched_at: float = 0.0
    offset: float = 0.0  # driver clock minus the replica's
    next_start: float | None = None  # driver time its next period starts; None: idle or held
    live: bool = False  # polled since the last settle (it may be stepping)
    polls_sent: int = 0  # to this actor (a settle names the last one)
    failures_in_a_row: int = 0
    stats: dict[str, float] = field(default_factory=dict)

    def load(self) -> float:
        return len(self.held) / self.capacity


def _new_stats() -> dict[str, float]:
    """A replica's totals. elapsed_s: the time it had work, by its own clock (its delivered
    periods); busy_slot_s: its engine's; deliveries: polls and settles it answered."""
    keys = ("steps", "tokens_generated", "restarts", "requests_resubmitted", "deliveries")
    counts = dict.fromkeys(keys, 0)
    return {**counts, **dict.fromkeys(("elapsed_s", "busy_slot_s", "reward_s"), 0.0)}


class ReplicaPool(EngineBase):
    """Implements `sortedrl.scheduling.protocol.Engine` over Ray actor replicas.

    `spawn(i)` starts replica i (an `EngineReplica` actor in its placement bundle) serving the
    weights the pool started with, as policy `version`. `report_s`: the longest a working
    replica goes without reporting (completions are reported at once).
    """

    steps_in_flight = True  # the replicas step by themselves between calls: settle() holds them

    def __init__(
        self,
        spawn: Callable[[int], Any],
        n_replicas: int,
        version: int,
        *,
        max_engine_failures: int = 4,
        weight_sync: WeightSync = "object_store",
        device: str = "cpu",
        report_s: float = 0.1,
        per_step: bool = False,
        backlog: int = 0,
    ) -> None:
        import ray

        if n_replicas < 1:
            raise ValueError(f"a replica pool needs at least one replica, got {n_replicas}")
        if weight_sync not in ("object_store", "broadcast"):
            raise ValueError(f"weight_sync: {weight_sync!r} is not object_store or broadcast")
        if report_s <= 0:
            raise ValueError(f"report_s: must be > 0 seconds, got {report_s}")
        if backlog < 0:
            raise ValueError(f"backlog: must be >= 0 requests per replica, got {backlog}")
        self._ray = ray
        self._spawn, self.max_engine_failures = spawn, max_engine_failures
        self.weight_sync: WeightSync = weight_sync
        self.device = device
        self.report_s, self.per_step, self.backlog = report_s, per_step, backlog
        self.submit_ahead = backlog * n_replicas
        self._version = version
        self._weights_ref: Any = None  # the last weights loaded (a restarted replica loads them)
        actors = [spawn(i) for i in range(n_replicas)]
        caps = ray.get([a.capacity.remote() for a in actors])
        self._reps = [
            _Replica(i, a, int(c), stats=_new_stats())
            for i, (a, c) in enumerate(zip(actors, caps, strict=True))
        ]
        for rep in self._reps:
            rep.offset = self._offset(rep.actor)
        self._waiting: deque[Request] = deque()
        self._held_report = StepReport()  # settled by abort/pause/load_weights, not yet returned
        self._clock = PoolClock([r.capacity for r in self._reps])
        self.weight_sync_s: list[float] = []
        self.restarts = 0
        self.finished_held_by_calls = 0  # see _settle_for_call
        self.polls = 0  # polls sent (each one round trip to a replica)
        self.settles = 0  # settle calls sent
        self.generating_s = 0.0  # the pool's reported elapsed time
        if weight_sync == "broadcast" and n_replicas > 1:
            self._form_group()

    # --- the Engine protocol ------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return sum(r.capacity for r in self._reps)

    @property
    def version(self) -> int:
        return self._version

    def num_unfinished(self) -> int:
        return (
            len(self._waiting)
            + sum(len(r.held) for r in self._reps)
            + len(self._held_report.finished)
        )

    def submit(self, requests: Sequence[Request]) -> None:
        self._waiting.extend(requests)
        self._route()

    def step(self) -> StepReport:
        """Send a poll to every working replica without one, wait for at least one (none
        when a settle left reports to return), collect every one that is ready; one merged
        report. The collected replicas go on stepping; their next polls go with the next
        `step()`, so they carry the requests the caller submits in between (a slot freed is
        refilled after one turn of the driver, not after a heartbeat)."""
        self._route()
        self._launch_idle()
        in_flight = [r.poll_ref for r in self._reps if r.poll_ref is not None]
        if in_flight:
            wait_for = 0 if self._held_report.finished else 1
            ready, _ = self._ray.wait(in_flight, num_returns=len(in_flight), timeout=0)
            if len(ready) < wait_for:
                ready, _ = self._ray.wait(in_flight, num_returns=1)
            self._collect(set(ready))
            self._route()
        return self._report()

    def settle(self) -> StepReport:
        """Hold every replica and report all they finished (and whatever a settle held)."""
        self._settle_all()
        return self._report()

    def abort(self, request_ids: Sequence[str]) -> list[Generation]:
        self._settle_for_call()
        wanted = set(request_ids)
        out = [_unstarted(q) for q in self._waiting if q.request_id in wanted]
        self._waiting = deque(q for q in self._waiting if q.request_id not in wanted)
        for rep in self._reps:
            out += self._take_unsent(rep, wanted)
            ids = [rid for rid in rep.held if rid in wanted]
            if ids:
                out += self._call(rep, lambda a, ids=ids: a.abort.remote(ids), forget=ids)
        return out

    def pause(self) -> list[Generation]:
        self._settle_for_call()
        out = [_unstarted(q) for q in self._waiting]
        self._waiting.clear()
        for rep in self._reps:
            out += self._take_unsent(rep, None)
            if rep.held:
                out += self._call(rep, lambda a: a.pause.remote(), forget=list(rep.held))
        return out

    def load_weights(self, weights: Any, version: int) -> float:
        """Every replica serves `weights` (a state dict or an `ObjectRef` to one; None: the
        weights in place) as `version`; returns the wall seconds of the whole sync."""
        t0 = time.perf_counter()
        self._settle_for_call()
        ray = self._ray
        if weights is not None:
            self._weights_ref = weights if isinstance(weights, ray.ObjectRef) else ray.put(weights)
        self._version = version
        if self.weight_sync == "broadcast" and len(self._reps) > 1 and weights is not None:
            self._broadcast_weights()
        else:
            ref = self._weights_ref if weights is not None else None
            self._each(lambda a: a.load_weights.remote(ref, version))
        seconds = time.perf_counter() - t0
        self.weight_sync_s.append(seconds)
        return seconds

    def rng_state(self) -> list[Any]:
        """Every replica's sampler state, by replica index."""
        return self._each(lambda a: a.rng_state.remote())

    def set_rng_state(self, state: Sequence[Any]) -> None:
        if len(state) != len(self._reps):
            raise ValueError(f"rng state of {len(state)} replicas for a pool of {len(self._reps)}")
        refs = [
            rep.actor.set_rng_state.remote(st) for rep, st in zip(self._reps, state, strict=True)
        ]
        self._ray.get(refs)

    def close(self) -> None:
        """Close and kill every replica."""
        ray = self._ray
        for rep in self._reps:
            try:
                ray.get(rep.actor.close.remote(), timeout=30)
            except Exception:  # dead already, or stuck: it is killed next either way
                pass
            try:
                ray.kill(rep.actor)
            except Exception:  # gone already
                pass
        self._waiting.clear()

    def evaluate(
        self, requests: Sequence[Request], temperature: float, top_p: float, seed: int
    ) -> list[Generation]:
        """Generate evaluation `requests` on the replicas (replica i takes every n-th, with
        sampling seed `seed + i`), each with an engine of its own over its current weights;
        the rollout requests they hold wait and are not touched."""
        n = len(self._reps)
        parts = [(rep, list(requests[rep.index :: n])) for rep in self._reps]
        refs = [
            rep.actor.evaluate.remote(part, temperature, top_p, seed + rep.index)
            for rep, part in parts
            if part
        ]
        return [g for done in self._ray.get(refs) for g in done]

    def in_flight(self) -> int:
        """Replicas stepping now by themselves: polled since the last settle, with work."""
        return sum(r.live and bool(r.held) for r in self._reps)

    def actors(self) -> list[Any]:
        """The replicas' actor handles, by index (a restarted replica's is the new one)."""
        return [r.actor for r in self._reps]

    @property
    def stats(self) -> dict[str, Any]:
        """Per replica (steps, time, busy, tokens, bubble) and pool totals. A replica's
        bubble_ratio is against the pool's generating time, as the simulated engine's
        replicas (a replica left without work is idle); busy_bubble_ratio against its own
        time with work."""
        per = []
        for rep in self._reps:
            s = dict(rep.stats)
            slot_s = rep.capacity * self.generating_s
            s["bubble_ratio"] = 1.0 - s["busy_slot_s"] / slot_s if slot_s > 0 else 0.0
            own = rep.capacity * s["elapsed_s"]
            s["busy_bubble_ratio"] = 1.0 - s["busy_slot_s"] / own if own > 0 else 0.0
            per.append(s)
        return {
            "replicas": per,
            "generating_s": self.generating_s,
            "polls": self.polls,
            "settles": self.settles,
            "weight_sync_s": list(self.weight_sync_s),
            "weight_sync_total_s": sum(self.weight_sync_s),
            "replica_restarts": self.restarts,
            "finished_held_by_calls": self.finished_held_by_calls,
        }

    # --- routing and stepping -----------------------------------------------------------------

    def _route(self) -> None:
        """Hand waiting requests, in order, to the least-loaded replica with room (a free slot
        or room in its backlog)."""
        while self._waiting:
            free = [r for r in self._reps if len(r.held) < r.capacity + self.backlog]
            if not free:
                return
            rep = min(free, key=lambda r: (r.load(), r.index))
            req = self._waiting.popleft()
            rep.held[req.request_id] = req
            rep.outbox.append(req)

    def _launch_idle(self) -> None:
        for rep in self._reps:
            if rep.poll_ref is None and rep.held:
                self._launch(rep)

    def _launch(self, rep: _Replica) -> None:
        sent, rep.outbox = rep.outbox, []
        rep.launched_at = time.perf_counter()
        rep.polls_sent += 1
        if self.per_step:
            rep.poll_ref = rep.actor.poll.remote(sent, None, 1, rep.polls_sent)
        else:
            rep.poll_ref = rep.actor.poll.remote(sent, self.report_s, None, rep.polls_sent)
        rep.live = True
        self.polls += 1
        self._clock.launched(rep.launched_at)

    def _collect(self, ready: set[Any]) -> None:
        """Take in the polls among `ready` (their refs)."""
        for rep in self._reps:
            if rep.poll_ref is None or rep.poll_ref not in ready:
                continue
            ref, rep.poll_ref = rep.poll_ref, None
            try:
                delivery = self._ray.get(ref)
            except self._ray.exceptions.RayError as e:
                self._replace(rep, e)
                continue
            self._take(rep, delivery)

    def _take(self, rep: _Replica, d: Any) -> None:
        """Take in replica `rep`'s delivery `d` (an `EngineReplica` `Delivery`)."""
        rep.failures_in_a_row = 0
        for g in d.finished:
            rep.held.pop(g.request_id, None)
        if d.unfinished != len(rep.held) - len(rep.outbox):
            raise RuntimeError(
                f"rollout replica {rep.index} holds {d.unfinished} requests, the pool counts "
                f"{len(rep.held) - len(rep.outbox)} sent to it and not returned"
            )
        self._clock.delivered(rep.index, d.start + rep.offset, d.end + rep.offset, d.busy_slot_s)
        rep.next_start = None if d.next_start is None else d.next_start + rep.offset
        st = rep.stats
        st["deliveries"] += 1
        st["steps"] += d.steps
        st["elapsed_s"] += d.end - d.start
        st["busy_slot_s"] += d.busy_slot_s
        st["tokens_generated"] += d.tokens_generated
        st["reward_s"] += d.reward_s
        held = self._held_report
        held.finished += d.finished
        held.tokens_generated += d.tokens_generated
        held.prefill_tokens += d.prefill_tokens

    def _settle_all(self) -> None:
        """Hold every replica that may be stepping and take in all it delivers. One that had
        no work at its last delivery and got none since has nothing to step or deliver."""
        live = [r for r in self._reps if r.live and (r.poll_ref is not None or r.held)]
        for rep in self._reps:
            rep.live = False
        calls = []
        for rep in live:
            calls.append((rep, rep.poll_ref, rep.actor.settle.remote(rep.polls_sent)))
            rep.poll_ref = None
            self.settles += 1
        for rep, poll_ref, settle_ref in calls:
            refs = [poll_ref, settle_ref] if poll_ref is not None else [settle_ref]
            try:
                deliveries = self._ray.get(refs)
            except self._ray.exceptions.RayError as e:
                self._replace(rep, e)
                continue
            for d in sorted(deliveries, key=lambda d: d.seq):
                self._take(rep, d)
            rep.next_start = None
        # Nothing runs now: the time up to here is accounted, what follows (an update, a
        # weight sync) is not generating time.
        self._accrue(None)

    def _settle_for_call(self) -> None:
        """Settle before abort/pause/load_weights; what finished is held for the next report
        (and counted: a loop that settles first leaves nothing here)."""
        before = len(self._held_report.finished)
        self._settle_all()
        self.finished_held_by_calls += len(self._held_report.finished) - before

    def _accrue(self, horizon: float | None) -> None:
        elapsed, busy = self._clock.report(horizon, time.perf_counter())
        self.generating_s += elapsed
        self._held_report.elapsed_s += elapsed
        self._held_report.busy_slot_s += busy

    def _horizon(self) -> float | None:
        """The earliest driver time from which a replica may still deliver busy time: where
        a working replica's next period starts, or when a poll reached an idle one (not
        before it was sent; not before now, for one whose poll is not sent yet). None: no
        replica is working."""
        starts = []
        for rep in self._reps:
            if rep.next_start is not None and (rep.poll_ref is not None or rep.held):
                starts.append(self._clock.next_floor(rep.index, rep.next_start))
            elif rep.poll_ref is not None:
                starts.append(rep.launched_at)
            elif rep.held:
                starts.append(time.perf_counter())
        return min(starts) if starts else None

    def _report(self) -> StepReport:
        self._accrue(self._horizon())
        report, self._held_report = self._held_report, StepReport()
        return report

    # --- calls that must reach every replica, and restarts -------------------------------------

    def _take_unsent(self, rep: _Replica, wanted: set[str] | None) -> list[Generation]:
        """Requests routed to `rep` but not sent yet (its step was in flight): returned as
        they were submitted. `wanted` None: all of them."""
        unsent = [q for q in rep.outbox if wanted is None or q.request_id in wanted]
        for q in unsent:
            del rep.held[q.request_id]
        rep.outbox = [q for q in rep.outbox if q.request_id in rep.held]
        return [_unstarted(q) for q in unsent]

    def _call(self, rep: _Replica, call: Callable[[Any], Any], forget: list[str]) -> Any:
        """`call(actor)` (abort or pause of the requests `forget`) on a settled replica. If it
        fails, the replica is restarted and those requests come back as they were submitted."""
        try:
            out = self._ray.get(call(rep.actor))
        except self._ray.exceptions.RayError as e:
            self._replace(rep, e)  # its requests are all unsent now: they come back as sent
            return self._take_unsent(rep, set(forget))
        for rid in forget:
            rep.held.pop(rid, None)
        rep.outbox = [q for q in rep.outbox if q.request_id in rep.held]
        return out

    def _each(self, call: Callable[[Any], Any]) -> list[Any]:
        """`call(actor)` on every replica at once; a replica that fails is restarted (and then
        already has the current weights and version) and answers None."""
        refs = [call(rep.actor) for rep in self._reps]
        out = []
        for rep, ref in zip(self._reps, refs, strict=True):
            try:
                out.append(self._ray.get(ref))
            except self._ray.exceptions.RayError as e:
                self._replace(rep, e)
                out.append(None)
        return out

    def _replace(self, rep: _Replica, error: Exception) -> None:
        """Kill replica `rep`, start a new one in its bundle with the current weights and give
        it the requests the old one held, as they were submitted."""
        rep.failures_in_a_row += 1
        if rep.failures_in_a_row >= self.max_engine_failures:
            raise ReplicaPoolError(
                f"rollout replica {rep.index} failed {rep.failures_in_a_row} time(s) in a row; "
                f"last error: {type(error).__name__}: {error}"
            ) from error
        print(
            f"warning: rollout replica {rep.index} failed ({type(error).__name__}: "
            f"{str(error)[-2000:]}); restarting it",
            file=sys.stderr,
        )
        ray = self._ray
        try:
            ray.kill(rep.actor)
        except Exception:  # already gone
            pass
        rep.poll_ref, rep.next_start, rep.live, rep.polls_sent = None, None, False, 0
        rep.actor = self._spawn(rep.index)
        self.restarts += 1
        try:
            rep.offset = self._offset(rep.actor)
            ray.get(rep.actor.load_weights.remote(self._weights_ref, self._version))
            if self.weight_sync == "broadcast" and len(self._reps) > 1:
                self._form_group()
        except ray.exceptions.RayError as e:
            self._replace(rep, e)
            return
        rep.outbox = list(rep.held.values())  # as submitted, in the order they were routed
        rep.stats["restarts"] += 1
        rep.stats["requests_resubmitted"] += len(rep.outbox)

    def _offset(self, actor: Any) -> float:
        """The driver's clock minus `actor`'s: 0 on this node (`time.perf_counter` is the
        machine's monotonic clock), else measured from the quickest of three round trips."""
        ray = self._ray
        here = ray.get_runtime_context().get_node_id()
        best: tuple[float, float] | None = None
        for _ in range(3):
            t0 = time.perf_counter()
            node, theirs = ray.get(actor.clock.remote())
            t1 = time.perf_counter()
            if node == here:
                return 0.0
            if best is None or t1 - t0 < best[0]:
                best = (t1 - t0, (t0 + t1) / 2 - theirs)
        assert best is not None
        return best[1]

    # --- the broadcast path -------------------------------------------------------------------

    def _form_group(self) -> None:
        """A process group of the replicas alone (after start and after every restart)."""
        backend = "nccl" if self.device.startswith("cuda") else "gloo"
        host, port = self._ray.get(self._reps[0].actor.free_address.remote())
        world = len(self._reps)
        self._ray.get(
            [
                rep.actor.join_group.remote(host, port, rep.index, world, backend)
                for rep in self._reps
            ]
        )

    def _broadcast_weights(self) -> None:
        """Replica 0 takes the weights from the object store, then sends them to the others
        over the group; all load them. A failure restarts the replica (which then loads the
        weights from the object store) and re-forms the group."""
        ray, version = self._ray, self._version
        first = self._reps[0]
        try:
            meta = ray.get(first.actor.stage.remote(self._weights_ref))
            ray.get(
                [rep.actor.load_broadcast.remote(meta, version, self.device) for rep in self._reps]
            )
        except ray.exceptions.RayError as e:
            # Which replica failed is not known from a collective: check each one.
            alive = self._each(lambda a: a.version.remote())
            for rep, v in zip(self._reps, alive, strict=True):
                if v is not None and v != version:
                    ray.get(rep.actor.load_weights.remote(self._weights_ref, version))
            if all(v is not None for v in alive):
                raise ReplicaPoolError(f"weight broadcast failed: {e}") from e


def _unstarted(req: Request) -> Generation:
    """A request that never reached an engine, returned as an abort (its resume partial)."""
    res = req.resume
    if res is None:
        return Generation(req.request_id, "abort", 0, [])
    return Generation(
        req.request_id, "abort", res.n_tokens, list(res.version_spans), res.token_ids, res.logprobs
    )


def replica_spawner(
    cfg: RunSettings,
    model: Any,
    tokenizer: Any,
    version: int,
    placement: Placement,
    problems_by_id: dict[str, Problem] | None,
) -> Callable[[int], Any]:
    """`spawn(i)`: start replica i in its placement bundle, serving `model`'s weights as
    `version` (`model`: a model object, or a model directory every replica loads itself). The
    config, model, tokenizer and problems go into the object store once here; every replica
    (and every restart) reads the same objects."""
    import ray

    from sortedrl.cluster.replica_actor import EngineReplica

    # Two threads: a settle (or a test's look) is answered while a poll waits.
    actor_cls = ray.remote(max_concurrency=2)(EngineReplica)
    refs = [ray.put(x) for x in (cfg, model, tokenizer, problems_by_id)]

    def spawn(i: int) -> Any:
        opts = placement.replica_options(i)
        return actor_cls.options(**opts).remote(refs[0], refs[1], refs[2], version, refs[3], i)

    return spawn


def build_replica_pool(
    cfg: RunSettings,
    model: Any,
    tokenizer: Any,
    version: int,
    placement: Placement,
    problems_by_id: dict[str, Problem] | None,
) -> ReplicaPool:
    """`cfg.cluster.rollout_replicas` replicas of the `cfg.rollout.engine` engine serving
    `model`'s weights as `version`, each in its placement bundle (`placement.start()` first);
    with `problems_by_id` they score their responses. GPU replicas sync weights by an NCCL
    broadcast, CPU ones from the object store; `max_engine_failures` failures of one replica
    in a row stop the pool."""
    spawn = replica_spawner(cfg, model, tokenizer, version, placement, problems_by_id)
    n = cfg.cluster.rollout_replicas
    gpu = cfg.model.device.startswith("cuda")
    return ReplicaPool(
        spawn,
        n,
        version,
        max_engine_failures=cfg.max_engine_failures,
        weight_sync="broadcast" if gpu and n > 1 else "object_store",
        device=cfg.model.device,
        report_s=cfg.cluster.replica_report_s,
        backlog=cfg.cluster.replica_backlog,
    )
