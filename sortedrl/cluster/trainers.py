"""FSDP2 trainer ranks as Ray actors, and the group that is one `Trainer` to the driver.

Each `TrainerRank` is a process (a Ray actor in its placement bundle) holding one rank of a
torch.distributed group: gloo on the CPU, NCCL on a GPU (Ray gives the actor its GPU as device
0). Rank 0 picks the rendezvous address and a free port; the group hands them to every rank,
and all ranks join together. Every rank builds its trainer from the driver's model, put in the
object store once, and gets the whole update batch, put there once per update
(`sortedrl.training.distributed` explains how the ranks share the work and stay exact).

A rank that dies cannot be replaced within a torch.distributed group: the group kills the
others and raises `TrainerRankDied`, and the run goes on from its last checkpoint
(`save_checkpoint`: sharded, each rank writing its part) with `--resume auto`.

Only the CPU path (gloo) has run here; the NCCL path is written but has not been run.
"""

from __future__ import annotations

import copy
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sortedrl.errors import SortedRLError, TrainerFailedError

if TYPE_CHECKING:
    from torch import Tensor, nn

    from sortedrl.cluster.placement import Placement
    from sortedrl.cluster.settings import RunSettings
    from sortedrl.scheduling.protocol import UpdateBatch, UpdateResult
    from sortedrl.training.config import TrainerConfig


class TrainerRankDied(TrainerFailedError):
    """A trainer rank's process died; the group was stopped with it."""

    def __init__(self, rank: int, during: str, cause: str) -> None:
        super().__init__(
            f"trainer rank {rank} died during {during} ({cause}). A torch.distributed group "
            "cannot go on without one of its ranks, so the other ranks were stopped and the run "
            "stops at its last checkpoint; run the same command with --resume auto to go on "
            "from there"
        )
        self.rank = rank


class TrainerRank:
    """One trainer rank in its own process; the group makes it a Ray actor."""

    def __init__(self, rank: int, world: int) -> None:
        self.rank = rank
        self.world = world
        self.trainer: Any = None

    def rendezvous(self) -> tuple[str, int]:
        """This node's address and a port free on it now (rank 0's become the group's)."""
        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            port = int(s.getsockname()[1])
        return ray.util.get_node_ip_address(), port

    def setup(
        self,
        master_addr: str,
        master_port: int,
        model: nn.Module,
        config: TrainerConfig,
        device: str,
        temperature: float,
        seed: int,
    ) -> None:
        """Join the group and build this rank's sharded trainer from `model`."""
        import torch

        from sortedrl.training.distributed import FSDPTrainer, init_process_group

        # Ray shows an actor only its own GPU(s), so the rank's GPU is device 0.
        dev = torch.device("cuda", 0) if device.startswith("cuda") else torch.device("cpu")
        init_process_group(self.rank, self.world, master_addr, master_port, dev)
        model.train()
        self.trainer = FSDPTrainer(model, config, dev, temperature=temperature, seed=seed)

    def update(self, batch: UpdateBatch) -> UpdateResult:
        """This rank's part of the update; the weights come back from rank 0 only."""
        return self.trainer.update(batch)

    def save(self, path: str) -> None:
        self.trainer.save(Path(path))

    def load(self, path: str) -> dict[str, Tensor] | None:
        """Restore a checkpoint; rank 0 returns the full weights for the driver's model."""
        self.trainer.load(Path(path))
        return self.trainer.full_state_dict()

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


class RayTrainerGroup:
    """`cluster.trainer_ranks` FSDP2 ranks as one `Trainer` for the driver's controller.

    `model` is the driver's model: each rank builds its trainer from a copy, and after every
    update (and checkpoint load) the group loads the new weights into it, so that evaluation
    and saving in the driver see the current policy. `placement` must be started. A rank that
    fails makes the group stop all of its ranks; a dead rank raises `TrainerRankDied`, and any
    other error of a rank is raised as that rank raised it.
    """

    virtual_time = False

    def __init__(self, cfg: RunSettings, model: nn.Module, placement: Placement) -> None:
        import ray

        self.model = model
        self.world = cfg.cluster.trainer_ranks
        actor = ray.remote(TrainerRank)
        self.ranks: list[Any] = [
            actor.options(**placement.rank_options(j)).remote(j, self.world)
            for j in range(self.world)
        ]
        self.closed = False
        addr, port = self._call("rendezvous", ranks=[0])[0]
        model_ref = ray.put(_on_cpu(model))
        self._call(
            "setup",
            addr,
            port,
            model_ref,
            cfg.trainer,
            cfg.model.device,
            cfg.rollout.temperature,
            cfg.seed,
        )

    # --- the Trainer protocol ------------------------------------------------------------------

    def update(self, batch: UpdateBatch) -> UpdateResult:
        """One update on all ranks; rank 0's statistics, the full weights (CPU tensors, the
        model's own names), also loaded into the driver's model. `elapsed_s` is this call's
        wall time; `stats["weights_gather_s"]` the time rank 0 took to gather the weights."""
        import ray

        t0 = time.perf_counter()
        results = self._call("update", ray.put(batch))
        result = results[0]
        self.model.load_state_dict(result.weights)
        result.elapsed_s = time.perf_counter() - t0
        result.stats["elapsed_s"] = result.elapsed_s
        return result

    # --- checkpoints ---------------------------------------------------------------------------

    def save_checkpoint(self, folder: str) -> None:
        """Write the sharded model, optimizer, schedule, counters and mini-batch RNG into
        `folder` (torch.distributed.checkpoint: each rank writes its own part; on several
        nodes `folder` must be on storage they share). Nothing goes into `trainer.pt`."""
        Path(folder).mkdir(parents=True, exist_ok=True)
        self._call("save", str(folder))

    def load_checkpoint(self, folder: str | None, state: dict[str, Any] | None) -> None:
        """Restore what `save_checkpoint` wrote, resharded to this group's size, and the
        weights into the driver's model."""
        if folder is None:
            raise ValueError(
                "its trainer state was written with cluster.backend=local, and this run uses "
                "cluster.backend=ray; resume with the backend that wrote it"
            )
        if not Path(folder).is_dir():
            raise SortedRLError(f"{folder}: no trainer checkpoint (not a directory)")
        weights = self._call("load", str(folder))[0]
        self.model.load_state_dict(weights)

    # --- lifetime ------------------------------------------------------------------------------

    def close(self) -> None:
        """Leave the process groups and kill the ranks (idempotent)."""
        import ray

        if self.closed:
            return
        self.closed = True
        alive = [r.close.remote() for r in self.ranks]
        ray.wait(alive, num_returns=len(alive), timeout=10.0)
        for r in self.ranks:
            ray.kill(r)

    def _kill_all(self) -> None:
        import ray

        self.closed = True
        for r in self.ranks:
            ray.kill(r)

    def _call(self, method: str, *args: Any, ranks: list[int] | None = None) -> list[Any]:
        """`method(*args)` on the ranks (all by default) at once, their results in rank order.
        The first rank to fail stops the group (the others would wait for it forever)."""
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        if self.closed:
            raise SortedRLError("the trainer group was stopped (a rank failed or it was closed)")
        which = list(range(self.world)) if ranks is None else ranks
        futures = {getattr(self.ranks[j], method).remote(*args): j for j in which}
        results: dict[int, Any] = {}
        pending = list(futures)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            j = futures[done[0]]
            try:
                results[j] = ray.get(done[0])
            except RayActorError as e:
                self._kill_all()
                raise TrainerRankDied(j, method, type(e).__name__) from None
            except RayTaskError as e:
                self._kill_all()
                raise e.as_instanceof_cause() from None
        return [results[j] for j in which]


def _on_cpu(model: nn.Module) -> nn.Module:
    """`model`, or a CPU copy of it if it lives on a GPU (the ranks place it themselves)."""
    if all(p.device.type == "cpu" for p in model.parameters()):
        return model
    return copy.deepcopy(model).cpu()
