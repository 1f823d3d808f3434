"""N engine replicas (Ray actors) presented to the controller as one `Engine`.

`ReplicaPool` keeps the controller unchanged: its capacity is the sum of the replicas'.

Routing: submitted requests wait in the pool in submission order and go, as slots free up, to
the replica with a free slot that is least loaded (unfinished requests relative to its
capacity; the lower index on a tie). The simulated engine routes the same way (one queue, a
request starts on a free replica, the least loaded first); it also checks KV room, which a
transformers replica does not have to.

Stepping is concurrent: each replica with work has one `step` in flight. `step()` waits for
at least one, collects every one that is ready, relaunches those and returns one merged
report; the others stay in flight across calls. `settle()` waits for all of them, so that
nothing runs behind the controller's back when it decides on an update (the run loop calls
it). `abort`, `pause` and `load_weights` settle first too; what finished meanwhile is held
and returned by the next `step()`/`settle()`. Time: see `sortedrl.cluster.pool_clock`.

Weights: `load_weights` puts the state dict into the object store once (an `ObjectRef` is used
as it is) and every replica loads that one object, concurrently (`weight_sync="object_store"`),
or replica 0 loads it and broadcasts it tensor by tensor to the others over their own process
group (`weight_sync="broadcast"`: NCCL between GPUs, gloo on the CPU).

Faults: a replica whose call raises a Ray error (the actor died, or its engine failed) is
killed and started again in its placement bundle, loads the current weights and gets back the
requests it held, as they were submitted (tokens it generated since were never returned, so
never counted). The controller never sees it. At the `max_engine_failures`-th failure of one
replica in a row the pool raises `ReplicaPoolError`.
"""

from __future__ import annotations

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
    outbox: list[Request] = field(default_factory=list)  # routed, goes with the next step
    step_ref: Any = None  # the step in flight
    launched_at: float = 0.0
    failures_in_a_row: int = 0
    stats: dict[str, float] = field(default_factory=dict)

    def load(self) -> float:
        return len(self.held) / self.capacity


def _new_stats() -> dict[str, float]:
    """A replica's totals; elapsed_s: its steps' wall time as the driver saw them (launch to
    collection), so its bubble counts the calls' overhead and the scoring too."""
    counts = dict.fromkeys(("steps", "tokens_generated", "restarts", "requests_resubmitted"), 0)
    return {**counts, **dict.fromkeys(("elapsed_s", "busy_slot_s", "reward_s"), 0.0)}


class ReplicaPool(EngineBase):
    """Implements `sortedrl.scheduling.protocol.Engine` over Ray actor replicas.

    `spawn(i)` starts replica i (an `EngineReplica` actor in its placement bundle) serving the
    weights the pool started with, as policy `version`.
    """

    steps_in_flight = True  # each replica's step stays in flight across calls

    def __init__(
        self,
        spawn: Callable[[int], Any],
        n_replicas: int,
        version: int,
        *,
        max_engine_failures: int = 4,
        weight_sync: WeightSync = "object_store",
        device: str = "cpu",
    ) -> None:
        import ray

        if n_replicas < 1:
            raise ValueError(f"a replica pool needs at least one replica, got {n_replicas}")
        if weight_sync not in ("object_store", "broadcast"):
            raise ValueError(f"weight_sync: {weight_sync!r} is not object_store or broadcast")
        self._ray = ray
        self._spawn, self.max_engine_failures = spawn, max_engine_failures
        self.weight_sync: WeightSync = weight_sync
        self.device = device
        self._version = version
        self._weights_ref: Any = None  # the last weights loaded (a restarted replica loads them)
        actors = [spawn(i) for i in range(n_replicas)]
        caps = ray.get([a.capacity.remote() for a in actors])
        self._reps = [
            _Replica(i, a, int(c), stats=_new_stats())
            for i, (a, c) in enumerate(zip(actors, caps, strict=True))
        ]
        self._waiting: deque[Request] = deque()
        self._held_report = StepReport()  # settled by abort/pause/load_weights, not yet returned
        self._clock = PoolClock()
        self.weight_sync_s: list[float] = []
        self.restarts = 0
        self.finished_held_by_calls = 0  # see _settle_for_call
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
        """Wait for at least one replica's step (none when a settle left reports to return),
        collect every one that is ready, relaunch them; one merged report."""
        self._route()
        self._launch_idle()
        in_flight = [r.step_ref for r in self._reps if r.step_ref is not None]
        if in_flight:
            wait_for = 0 if self._held_report.finished else 1
            ready, _ = self._ray.wait(in_flight, num_returns=len(in_flight), timeout=0)
            if len(ready) < wait_for:
                ready, _ = self._ray.wait(in_flight, num_returns=1)
            self._collect(set(ready))
            self._route()
            self._launch_idle()
        return self._report()

    def settle(self) -> StepReport:
        """Wait for every step in flight and report them (and whatever a settle held)."""
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
        """Replica steps running now (launched, not yet collected)."""
        return sum(r.step_ref is not None for r in self._reps)

    def actors(self) -> list[Any]:
        """The replicas' actor handles, by index (a restarted replica's is the new one)."""
        return [r.actor for r in self._reps]

    @property
    def stats(self) -> dict[str, Any]:
        """Per replica (steps, elapsed, busy, tokens, bubble) and pool totals."""
        per = []
        for rep in self._reps:
            s = dict(rep.stats)
            slot_s = rep.capacity * s["elapsed_s"]
            s["bubble_ratio"] = 1.0 - s["busy_slot_s"] / slot_s if slot_s > 0 else 0.0
            per.append(s)
        return {
            "replicas": per,
            "weight_sync_s": list(self.weight_sync_s),
            "weight_sync_total_s": sum(self.weight_sync_s),
            "replica_restarts": self.restarts,
            "finished_held_by_calls": self.finished_held_by_calls,
        }

    # --- routing and stepping -----------------------------------------------------------------

    def _route(self) -> None:
        """Hand waiting requests, in order, to the least-loaded replica with a free slot."""
        while self._waiting:
            free = [r for r in self._reps if len(r.held) < r.capacity]
            if not free:
                return
            rep = min(free, key=lambda r: (r.load(), r.index))
            req = self._waiting.popleft()
            rep.held[req.request_id] = req
            rep.outbox.append(req)

    def _launch_idle(self) -> None:
        for rep in self._reps:
            if rep.step_ref is None and rep.held:
                self._launch(rep)

    def _launch(self, rep: _Replica) -> None:
        sent, rep.outbox = rep.outbox, []
        rep.launched_at = time.perf_counter()
        rep.step_ref = rep.actor.step.remote(sent)
        self._clock.launched(rep.launched_at)

    def _collect(self, ready: set[Any]) -> None:
        """Take in the finished steps among `ready` (their refs)."""
        for rep in self._reps:
            if rep.step_ref is None or rep.step_ref not in ready:
                continue
            ref, rep.step_ref = rep.step_ref, None
            try:
                report, unfinished, reward_s = self._ray.get(ref)
            except self._ray.exceptions.RayError as e:
                self._replace(rep, e)
                continue
            now = time.perf_counter()
            rep.failures_in_a_row = 0
            for g in report.finished:
                rep.held.pop(g.request_id, None)
            if unfinished != len(rep.held) - len(rep.outbox):
                raise RuntimeError(
                    f"rollout replica {rep.index} holds {unfinished} requests, the pool counts "
                    f"{len(rep.held) - len(rep.outbox)} sent to it and not returned"
                )
            self._clock.collected(rep.index, rep.launched_at, now, report.busy_slot_s)
            st = rep.stats
            st["steps"] += 1
            st["elapsed_s"] += now - rep.launched_at
            st["busy_slot_s"] += report.busy_slot_s
            st["tokens_generated"] += report.tokens_generated
            st["reward_s"] += reward_s
            held = self._held_report
            held.finished += report.finished
            held.tokens_generated += report.tokens_generated
            held.prefill_tokens += report.prefill_tokens

    def _settle_all(self) -> None:
        while any(r.step_ref is not None for r in self._reps):
            refs = [r.step_ref for r in self._reps if r.step_ref is not None]
            self._ray.wait(refs, num_returns=len(refs))
            self._collect(set(refs))
        # Nothing in flight now: the time up to here is accounted, what follows (an update, a
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
        self._held_report.elapsed_s += elapsed
        self._held_report.busy_slot_s += busy

    def _report(self) -> StepReport:
        in_flight = [r.launched_at for r in self._reps if r.step_ref is not None]
        self._accrue(min(in_flight) if in_flight else None)
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
        ray = self._ray
        try:
            ray.kill(rep.actor)
        except Exception:  # already gone
            pass
        rep.step_ref = None
        rep.actor = self._spawn(rep.index)
        self.restarts += 1
        try:
            ray.get(rep.actor.load_weights.remote(self._weights_ref, self._version))
            if self.weight_sync == "broadcast" and len(self._reps) > 1:
                self._form_group()
        except ray.exceptions.RayError as e:
            self._replace(rep, e)
            return
        rep.outbox = list(rep.held.values())  # as submitted, in the order they were routed
        rep.stats["restarts"] += 1
        rep.stats["requests_resubmitted"] += len(rep.outbox)

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

    actor_cls = ray.remote(EngineReplica)
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
    )
