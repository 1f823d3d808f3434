"""One rollout engine replica, run as a Ray actor (`ray.remote(EngineReplica)`).

The replica holds an engine built by the factory (`rollout.engine`: transformers or vLLM) and
runs it by itself: a thread of its own (the engine loop) steps the engine continuously while
the replica is live and has work, and keeps what finished, scored, until the driver takes it.
Only the loop thread touches the engine; the actor's methods are messages to it:

- `poll(requests, wait_s, max_steps)` hands over new requests, makes the replica live, and
  returns a `Delivery` as soon as something has finished (all that finished by then), when
  the replica runs out of work, after `wait_s` (a heartbeat carrying its busy time), or,
  when it starts from idle or a hold, after its first step (the driver knows it started).
  `max_steps=1` is the old protocol, one engine step per call (the benchmarks' baseline).
- `settle()` holds the replica: the step in progress completes, no other starts, and the
  delivery returns everything that finished. Nothing finishes after it until the next poll.
- `abort`, `pause`, `load_weights`, `rng_state`, ... run on the loop thread between steps.

A method may run while a `poll` waits (the pool starts the actor with `max_concurrency` > 1);
an actor started with one thread still works, a settle then waits for the poll's heartbeat.
A threaded actor may run a settle before a poll sent ahead of it, so polls are numbered and a
settle first waits for the poll it follows to be handed over.

Time is the replica's own (`time.perf_counter`): a delivery covers a period from one step
boundary to another, and its busy slot-time is what the engine reported for the steps that
ended in it, so the round trip to the driver is never counted as idle slot time. A period
starts where the last one ended while the replica has work, or at its first step after it was
idle or held (the time before is not the replica's generating time).

It scores its own finished responses with the task's scorer (`make_scorer`: the size limit,
the hard time limit and the sandbox workers as in a local run), so a finished `Generation`
comes back with `score` set and the driver does not score it again. The problems arrive
once, as a dict by prompt id, through the object store.

Weights reach a replica in one of two ways (see `ReplicaPool.load_weights`): from one object
in the Ray object store (`load_weights`), or by a broadcast from replica 0 over a process
group of the replicas alone (`join_group`, `stage`, `load_broadcast`): gloo on the CPU, NCCL
on GPUs. The group is private (its own TCP store), so it does not touch a default process
group the engine may have made for itself (vLLM does).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sortedrl.cluster.settings import RunSettings
from sortedrl.scheduling.protocol import Generation, Request, StepReport

#: Seconds the replicas wait for each other when they form a broadcast group.
GROUP_TIMEOUT_S = 120.0


@dataclass
class Delivery:
    """What a replica returns to the driver: what finished in one period of its own clock.

    `start`/`end` are step boundaries in the replica's `time.perf_counter` (no step ended in
    the period: `end == start`); `next_start` is where its next period starts (None: it has
    no work or is held, so the next period starts at its next step). `unfinished`: requests
    it holds after the delivery (running, queued, or handed over and not yet started).
    """

    seq: int
    start: float
    end: float
    next_start: float | None
    finished: list[Generation] = field(default_factory=list)
    busy_slot_s: float = 0.0
    tokens_generated: int = 0
    prefill_tokens: int = 0
    steps: int = 0
    reward_s: float = 0.0
    unfinished: int = 0


class EngineReplica:
    """An engine serving policy `version` with the weights of `model`, plus its scorer."""

    def __init__(
        self,
        cfg: RunSettings,
        model: Any,
        tokenizer: Any,
        version: int,
        problems: Mapping[str, Any] | None,
        index: int,
    ) -> None:
        from sortedrl.engines.factory import build_engine

        scorer = None
        if problems is not None:
            from sortedrl.tasks.registry import build_task
            from sortedrl.tasks.scoring import make_scorer

            scorer = make_scorer(cfg.task, build_task(cfg.task))
        # Replica i samples from its own stream: seed + i (replica 0 samples as a local run).
        engine = build_engine(
            cfg.rollout,
            cfg.model,
            cfg.seed + index,
            model,
            tokenizer,
            version,
            tensor_parallel_size=cfg.cluster.tensor_parallel_size,
        )
        self._setup(engine, tokenizer, scorer, problems)

    def _setup(
        self, engine: Any, tokenizer: Any, scorer: Any, problems: Mapping[str, Any] | None
    ) -> None:
        """The replica's state around `engine` (a subclass may build the engine its own way)."""
        self.engine, self.tokenizer = engine, tokenizer
        self.scorer, self.problems = scorer, problems
        self.prompt_of: dict[str, str] = {}  # request id -> prompt id, until it comes back
        self.group: Any = None  # the broadcast group, once joined
        self.group_rank = -1
        self.staged: dict[str, Any] | None = None  # replica 0: the weights it broadcasts
        # Everything below is shared with the loop thread, under `_cond`.
        self._cond = threading.Condition()
        self._handed: list[Request] = []  # handed over by a poll, not yet given to the engine
        self._calls: deque[tuple[Callable[[], Any], Future]] = deque()
        self._live = False  # steps while it has work; a poll sets it, a settle clears it
        self._held = False  # cleared by a settle, not by running out of `max_steps`
        self._steps_left: int | None = None  # None: no limit
        self._stepping = False
        self._unfinished = 0  # the engine's count after its last step or call
        self._error: BaseException | None = None
        self._closed = False
        self._seq = 0
        self._polls = 0  # the number of the latest poll handed over
        self._period: float | None = None  # start of the period in progress
        self._last_end: float | None = None  # end of the last step
        # The period's totals so far; its `finished` are scored and not yet delivered.
        self._acc = Delivery(0, 0.0, 0.0, None)
        self._thread = threading.Thread(target=self._loop, name="engine-loop", daemon=True)
        self._thread.start()

    # --- messages -------------------------------------------------------------------------------

    def capacity(self) -> int:
        return self.engine.capacity

    def clock(self) -> tuple[str, float]:
        """This replica's node and its clock now (the driver maps its periods to its own)."""
        import ray

        return ray.get_runtime_context().get_node_id(), time.perf_counter()

    def version(self) -> int:
        return self._on_loop(lambda: self.engine.version)

    def num_unfinished(self) -> int:
        with self._cond:
            return self._unfinished + len(self._handed) + len(self._acc.finished)

    def poll(
        self,
        requests: Sequence[Request],
        wait_s: float | None,
        max_steps: int | None = None,
        number: int = 0,
    ) -> Delivery:
        """Hand over `requests`, go live (at most `max_steps` more steps), and return what
        finished: at the first completion, when out of work or held, or after `wait_s`.
        `number`: the driver's count of polls sent to this replica, this one included."""
        fresh = self._hand_over(requests, max_steps, number)
        return self._deliver_when_ready(wait_s, fresh)

    def settle(self, after: int = 0) -> Delivery:
        """Hold: the step in progress completes and no other starts; returns what finished.
        `after`: the number of the last poll sent before it, which is handed over first."""
        with self._cond:
            while self._polls < after and self._error is None:
                self._cond.wait()
            self._live, self._held = False, True
            self._cond.notify_all()
            while self._stepping and self._error is None:
                self._cond.wait()
            return self._cut()

    def undelivered(self) -> int:
        """Finished generations waiting for the driver (for tests)."""
        with self._cond:
            return len(self._acc.finished)

    def abort(self, request_ids: Sequence[str]) -> list[Generation]:
        return self._returned(self._on_loop(lambda: self.engine.abort(request_ids)))

    def pause(self) -> list[Generation]:
        return self._returned(self._on_loop(self.engine.pause))

    def load_weights(self, weights: Any, version: int) -> float:
        return self._on_loop(lambda: self.engine.load_weights(weights, version))

    def rng_state(self) -> Any:
        return self._on_loop(self.engine.rng_state)

    def set_rng_state(self, state: Any) -> None:
        if state is not None:
            self._on_loop(lambda: self.engine.set_rng_state(state))

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=60)
        self.engine.close()
        if self.scorer is not None:
            self.scorer.close()

    # --- evaluation -----------------------------------------------------------------------------

    def evaluate(
        self, requests: Sequence[Request], temperature: float, top_p: float, seed: int
    ) -> list[Generation]:
        """Generate `requests` to completion on this replica's current weights, with an engine
        of their own over the same model (its own KV cache and sampler: the rollout engine's
        requests and RNG are untouched). Transformers replicas only."""
        from sortedrl.engines.transformers_engine import TransformersEngine

        if not isinstance(self.engine, TransformersEngine):
            raise TypeError(f"evaluation on a replica needs the transformers engine, not "
                            f"{type(self.engine).__name__}")  # fmt: skip
        engine = TransformersEngine(
            self.engine.model,
            self.tokenizer,
            capacity=self.engine.capacity,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            device=self.engine.device,
        )

        def run() -> list[Generation]:  # on the loop thread: the rollout waits meanwhile
            engine.submit(requests)
            out: list[Generation] = []
            while engine.num_unfinished():
                out += engine.step().finished
            return out

        return self._on_loop(run)

    # --- the engine loop ------------------------------------------------------------------------

    def _engine_step(self) -> StepReport:
        """One engine step (a test replica may wrap it)."""
        return self.engine.step()

    def _loop(self) -> None:
        cond = self._cond
        while True:
            with cond:
                while not (self._closed or self._calls or self._can_step()):
                    cond.wait()
                if self._closed:
                    return
                call = self._calls.popleft() if self._calls else None
                if call is None:
                    handed, self._handed = self._handed, []
                    self._unfinished += len(handed)  # in the engine from now on
                    self._stepping = True
                    if self._period is None:  # work after idle or held: a new period
                        self._period = time.perf_counter()
            if call is not None:
                self._run_call(*call)
                continue
            try:
                if handed:
                    self.engine.submit(handed)
                report = self._engine_step()
                reward_s = self._score(report.finished)
                unfinished = self.engine.num_unfinished()
            except BaseException as e:  # the engine failed: every later message raises it
                with cond:
                    self._error, self._stepping = e, False
                    cond.notify_all()
                continue
            with cond:
                self._stepping = False
                self._last_end = time.perf_counter()
                acc = self._acc
                acc.finished += report.finished
                acc.busy_slot_s += report.busy_slot_s
                acc.tokens_generated += report.tokens_generated
                acc.prefill_tokens += report.prefill_tokens
                acc.steps += 1
                acc.reward_s += reward_s
                self._unfinished = unfinished
                if self._steps_left is not None:
                    self._steps_left -= 1
                    if self._steps_left <= 0:
                        self._live = False
                cond.notify_all()

    def _can_step(self) -> bool:
        return self._live and self._error is None and bool(self._handed or self._unfinished)

    def _run_call(self, fn: Callable[[], Any], fut: Future) -> None:
        with self._cond:
            handed, self._handed = self._handed, []
            self._unfinished += len(handed)
        try:
            if handed:  # handed over but not started (held): the engine returns them too
                self.engine.submit(handed)
            out = fn()
        except BaseException as e:
            fut.set_exception(e)
        else:
            fut.set_result(out)
        with self._cond:
            if self._error is None:
                try:
                    self._unfinished = self.engine.num_unfinished()
                except BaseException as e:
                    self._error = e
            self._cond.notify_all()

    def _on_loop(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the loop thread, between steps; its result or its exception."""
        fut: Future = Future()
        with self._cond:
            if self._error is not None:
                raise self._error
            self._calls.append((fn, fut))
            self._cond.notify_all()
        return fut.result()

    def _hand_over(self, requests: Sequence[Request], max_steps: int | None, number: int) -> bool:
        """Returns whether the replica starts afresh (it was idle or held): its first step is
        then reported at once, so the driver knows the work started."""
        with self._cond:
            self._polls = max(self._polls, number)
            self._cond.notify_all()  # a settle may wait for this poll
            if self._error is not None:
                raise self._error
            if requests:
                self.prompt_of.update({r.request_id: r.prompt_id for r in requests})
                self._handed += requests
            if self._held:
                if not self._stepping:  # a period after a hold starts at its first step
                    self._period = None
                self._held = False
            fresh = self._period is None and not self._stepping
            self._live, self._steps_left = True, max_steps
            self._cond.notify_all()
            return fresh

    def _deliver_when_ready(self, wait_s: float | None, fresh: bool = False) -> Delivery:
        deadline = None if wait_s is None else time.perf_counter() + wait_s
        with self._cond:
            while self._error is None and not self._acc.finished:
                if fresh and self._acc.steps:
                    break
                busy = self._stepping or self._can_step()
                if not busy:  # out of work, held, or out of steps
                    break
                timeout = None if deadline is None else deadline - time.perf_counter()
                if timeout is not None and timeout <= 0:
                    break
                self._cond.wait(timeout)
            if self._error is not None:
                raise self._error
            return self._cut()

    def _cut(self) -> Delivery:
        """Deliver the period up to the last step's end (under `_cond`). A step in progress
        belongs to the next period, which starts there, so no period's busy slot-time
        exceeds capacity x its length."""
        if self._error is not None:
            raise self._error
        acc = self._acc
        if acc.steps:
            assert self._period is not None and self._last_end is not None
            start, end = self._period, max(self._period, self._last_end)
            working = self._stepping or bool(self._handed or self._unfinished)
            self._period = end if working else None
        else:  # no step ended: an empty period, the one in progress goes on
            start = end = self._period if self._period is not None else time.perf_counter()
        if self._held and not self._stepping:  # a step completing now is in the next period
            self._period = None
        self._seq += 1
        out = Delivery(
            self._seq,
            start,
            end,
            self._period,
            acc.finished,
            acc.busy_slot_s,
            acc.tokens_generated,
            acc.prefill_tokens,
            acc.steps,
            acc.reward_s,
            self._unfinished + len(self._handed),
        )
        self._acc = Delivery(0, 0.0, 0.0, None)
        return out

    # --- scoring --------------------------------------------------------------------------------

    def _returned(self, gens: list[Generation]) -> list[Generation]:
        for g in gens:
            self.prompt_of.pop(g.request_id, None)
        return gens

    def _score(self, finished: list[Generation]) -> float:
        """Score the finished responses in place (`Generation.score`); aborted ones stay
        unscored (they are resumed, not trained)."""
        pids = {g.request_id: self.prompt_of.get(g.request_id) for g in finished}
        self._returned(finished)
        if self.scorer is None or not finished:
            return 0.0
        from sortedrl.tasks.scoring import score_generations

        t0 = time.perf_counter()
        todo = [g for g in finished if g.finish_reason != "abort"]
        items = []
        for g in todo:
            problem = self.problems.get(pids[g.request_id] or "") if self.problems else None
            if problem is None:
                raise KeyError(
                    f"replica: no problem for prompt id {pids[g.request_id]!r} to score "
                    f"request {g.request_id!r} against"
                )
            items.append((problem, g.token_ids))
        for g, score in zip(
            todo, score_generations(self.scorer, self.tokenizer, items), strict=True
        ):
            g.score = score
        return time.perf_counter() - t0

    # --- the broadcast group ------------------------------------------------------------------

    def free_address(self) -> tuple[str, int]:
        """This node's address and a free TCP port on it (for the group's store)."""
        import socket

        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def join_group(self, host: str, port: int, rank: int, world: int, backend: str) -> None:
        """Join a process group of the replicas alone (its own TCP store): rank 0 hosts it."""
        import torch.distributed as dist

        store = dist.TCPStore(
            host, port, world, is_master=rank == 0, timeout=timedelta(seconds=GROUP_TIMEOUT_S)
        )
        if backend == "nccl":
            self.group = dist.ProcessGroupNCCL(store, rank, world)
        else:
            self.group = dist.ProcessGroupGloo(
                store, rank, world, timedelta(seconds=GROUP_TIMEOUT_S)
            )
        self.group_rank = rank

    def stage(self, weights: Mapping[str, Any]) -> list[tuple[str, list[int], str]]:
        """Replica 0 keeps `weights` to broadcast; returns (name, shape, dtype) of each."""
        self.staged = dict(weights)
        return [
            (k, list(v.shape), str(v.dtype).removeprefix("torch."))
            for k, v in sorted(self.staged.items())
        ]

    def load_broadcast(
        self, meta: Sequence[tuple[str, list[int], str]], version: int, device: str
    ) -> float:
        """Every replica at once: rank 0 sends its staged weights tensor by tensor (in `meta`
        order), the others receive them on `device`; then each loads them."""
        import torch

        if self.group is None:
            raise RuntimeError("load_broadcast before join_group")
        t0 = time.perf_counter()
        received: dict[str, Any] = {}
        for name, shape, dtype in meta:
            if self.group_rank == 0:
                assert self.staged is not None, "stage() first"
                t = self.staged[name].detach().to(device).contiguous()
            else:
                t = torch.empty(shape, dtype=getattr(torch, dtype), device=device)
            self.group.broadcast([t], _root0()).wait()
            received[name] = t
        self.staged = None
        self.engine.load_weights(received, version)
        return time.perf_counter() - t0


def _root0() -> Any:
    import torch.distributed as dist

    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    return opts
