"""`cluster` settings: where rollout replicas and trainer ranks run.

`local` (the default) is one process: one engine, one trainer. `ray` places
`rollout_replicas` engine replicas and `trainer_ranks` FSDP2 trainer ranks as Ray actors in
one placement group, driven by the same controller in the driver process. Importing this
module imports neither Ray nor torch.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Layout = Literal["colocated", "separate"]


class ClusterConfig(BaseModel):
    """How the run is spread over processes and devices (`cluster.*` in the train config)."""

    model_config = ConfigDict(extra="forbid")

    backend: Literal["local", "ray"] = Field(
        "local",
        description="local: one process (one engine, one trainer); ray: engine replicas and "
        "trainer ranks in Ray actors (pip install -e '.[ray]')",
    )
    address: str | None = Field(
        None,
        description="ray: the cluster to connect to ('auto' for the one `ray start --head` "
        "made on this node, or 'host:port'); empty: start a local Ray instance for the run",
    )
    rollout_replicas: int = Field(
        1, ge=1, description="rollout engine replicas, each a Ray actor with its own engine"
    )
    trainer_ranks: int = Field(
        1,
        ge=1,
        description="trainer processes in one torch.distributed group, the model sharded over "
        "them with FSDP2 (gloo on CPU, NCCL on GPU)",
    )
    replica_cpus: float = Field(1.0, gt=0, description="CPUs reserved for each replica")
    replica_gpus: float | None = Field(
        None,
        ge=0,
        description="GPUs for each replica; empty: tensor_parallel_size on a GPU "
        "(model.device cuda), 0 on the CPU",
    )
    replica_report_s: float = Field(
        0.1,
        gt=0,
        description="the longest a working replica goes without reporting to the driver "
        "(a heartbeat with its busy time); what finishes is reported at once",
    )
    replica_backlog: int = Field(
        8,
        ge=0,
        description="requests each replica holds beyond its slots, already admitted by the "
        "controller, and starts as its slots free up (a freed slot is refilled without a "
        "round trip to the driver); 0: only as many as it has free slots",
    )
    rank_cpus: float = Field(1.0, gt=0, description="CPUs reserved for each trainer rank")
    rank_gpus: float | None = Field(
        None, ge=0, description="GPUs for each trainer rank; empty: 1 on a GPU, 0 on the CPU"
    )
    tensor_parallel_size: int = Field(
        1, ge=1, description="GPUs one vLLM replica shards its model over (vLLM only)"
    )
    layout: Layout | None = Field(
        None,
        description="colocated: replicas and ranks share devices and take turns (replica i and "
        "rank i share placement bundle i); separate: each has devices of its own, so rollout "
        "goes on while the trainer updates; empty: separate for the async policy, colocated "
        "for the others",
    )

    @model_validator(mode="after")
    def _consistent(self) -> ClusterConfig:
        if self.backend == "local":
            spread = [
                f"{k}={getattr(self, k)}"
                for k in ("rollout_replicas", "trainer_ranks", "tensor_parallel_size")
                if getattr(self, k) != 1
            ]
            if self.address is not None:
                spread.append(f"address={self.address!r}")
            if spread:
                raise ValueError(
                    f"{', '.join(spread)}: needs cluster.backend=ray (the local backend is one "
                    "engine and one trainer in this process)"
                )
        return self

    def resolved_layout(self, policy: str) -> Layout:
        """`layout`, or its default for `policy`."""
        if self.layout is not None:
            return self.layout
        return "separate" if policy == "async" else "colocated"

    def gpus_per_replica(self, device: str) -> float:
        if self.replica_gpus is not None:
            return self.replica_gpus
        return float(self.tensor_parallel_size) if device.startswith("cuda") else 0.0

    def gpus_per_rank(self, device: str) -> float:
        if self.rank_gpus is not None:
            return self.rank_gpus
        return 1.0 if device.startswith("cuda") else 0.0
