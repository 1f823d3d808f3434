"""One rollout engine replica, run as a Ray actor (`ray.remote(EngineReplica)`).

The replica holds an engine built by the factory (`rollout.engine`: transformers or vLLM) and
forwards the engine protocol to it. It scores its own finished responses with the task's
scorer (`make_scorer`: the size limit, the hard time limit and the sandbox workers as in a
local run), so a finished `Generation` comes back with `score` set and the driver does not
score it again. The problems arrive once, as a dict by prompt id, through the object store.

Weights reach a replica in one of two ways (see `ReplicaPool.load_weights`): from one object
in the Ray object store (`load_weights`), or by a broadcast from replica 0 over a process
group of the replicas alone (`join_group`, `stage`, `load_broadcast`): gloo on the CPU, NCCL
on GPUs. The group is private (its own TCP store), so it does not touch a default process
group the engine may have made for itself (vLLM does).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any

from sortedrl.cluster.settings import RunSettings
from sortedrl.scheduling.protocol import Generation, Request, StepReport

#: Seconds the replicas wait for each other when they form a broadcast group.
GROUP_TIMEOUT_S = 120.0


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

    # --- the engine protocol ------------------------------------------------------------------

    def capacity(self) -> int:
        return self.engine.capacity

    def version(self) -> int:
        return self.engine.version

    def num_unfinished(self) -> int:
        return self.engine.num_unfinished()

    def step(self, requests: Sequence[Request]) -> tuple[StepReport, int, float]:
        """Submit `requests`, advance one step, score what finished. Returns the report, the
        requests still unfinished here, and the seconds spent scoring."""
        if requests:
            self.prompt_of.update({r.request_id: r.prompt_id for r in requests})
            self.engine.submit(requests)
        report = self.engine.step()
        reward_s = self._score(report.finished)
        return report, self.engine.num_unfinished(), reward_s

    def abort(self, request_ids: Sequence[str]) -> list[Generation]:
        return self._returned(self.engine.abort(request_ids))

    def pause(self) -> list[Generation]:
        return self._returned(self.engine.pause())

    def load_weights(self, weights: Any, version: int) -> float:
        return self.engine.load_weights(weights, version)

    def rng_state(self) -> Any:
        return self.engine.rng_state()

    def set_rng_state(self, state: Any) -> None:
        if state is not None:
            self.engine.set_rng_state(state)

    def close(self) -> None:
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
        engine.submit(requests)
        out: list[Generation] = []
        while engine.num_unfinished():
            out += engine.step().finished
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
