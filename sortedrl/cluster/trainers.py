"""FSDP2 trainer ranks as Ray actors, and the group that is one `Trainer` to the driver.

Each `TrainerRank` is a process (a Ray actor in its placement bundle) holding one rank of a
torch.distributed group: gloo on the CPU, NCCL on a GPU (Ray gives the actor its GPU as device
0). Rank 0 picks the rendezvous address and a free port; the group hands them to every rank,
and all ranks join together. The driver writes its model once to a directory (safetensors);
every rank builds the model on the meta device and reads only its own shards from there
(`sortedrl.training.sharded_load`), so no rank holds the whole model. Every rank gets the whole
update batch, put in the object store once per update (`sortedrl.training.distributed` explains
how the ranks share the work and stay exact).

Weights after an update: rank 0 gathers them and puts them into the object store itself; the
driver gets only the reference (`UpdateResult.weights` is an `ObjectRef`) and hands it on to
the replicas, so the weights make one trip, rank 0 -> object store -> each replica, and never
pass through the driver. The driver's own model is brought up to date from the last reference
only when something in the driver reads it (`pull_weights`: evaluation on vLLM replicas,
which runs in the driver). `stats["weight_bytes"]` is the size of that object.

Neither checkpoints nor the final model need the driver's copy: a checkpoint's weights are the
ranks' own shards (`save_checkpoint`, torch.distributed.checkpoint, each rank writing its part;
no `model.safetensors`), and the final Hugging Face directory is written by the ranks one
tensor at a time (`export_pretrained`, `sortedrl.training.hf_export`).

A rank that dies cannot be replaced within a torch.distributed group: the group kills the
others and raises `TrainerRankDied`, and the run goes on from its last checkpoint with
`--resume auto`.

Only the CPU path (gloo) has run here; the NCCL path is written but has not been run.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
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


def tied_aliases(model: nn.Module) -> set[str]:
    """Names of `model`'s parameters that are another name's parameter (tied weights)."""
    every = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    return every - {name for name, _ in model.named_parameters()}


def load_into(model: nn.Module, weights: dict[str, Tensor]) -> None:
    """`model.load_state_dict(weights)`, where a tied weight may come under its first name
    only."""
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = sorted(set(missing) - tied_aliases(model))
    if missing or unexpected:
        raise ValueError(
            f"weights do not match the model (missing {missing[:5]}, unexpected "
            f"{sorted(unexpected)[:5]})"
        )


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
        model_dir: str,
        config: TrainerConfig,
        device: str,
        temperature: float,
        seed: int,
    ) -> None:
        """Join the group and build this rank's sharded trainer from the model directory."""
        import torch

        from sortedrl.training.distributed import FSDPTrainer, init_process_group

        # Ray shows an actor only its own GPU(s), so the rank's GPU is device 0.
        dev = torch.device("cuda", 0) if device.startswith("cuda") else torch.device("cpu")
        init_process_group(self.rank, self.world, master_addr, master_port, dev)
        self.trainer = FSDPTrainer(model_dir, config, dev, temperature=temperature, seed=seed)

    def update(self, batch: UpdateBatch) -> UpdateResult:
        """This rank's part of the update. Rank 0 puts the new weights into the object store
        and returns their reference (the other ranks return none)."""
        import ray

        result = self.trainer.update(batch)
        weights = result.weights
        if weights is not None:
            # A tied weight (a tied lm_head) travels once, under its first name, as the model's
            # files hold it; the engines load it into every name it is tied to.
            for name in tied_aliases(self.trainer.model):
                weights.pop(name, None)
            result.stats["weight_bytes"] = float(
                sum(t.numel() * t.element_size() for t in weights.values())
            )
            result.weights = ray.put(weights)  # owned by this rank: lives as long as the group
        return result

    def save(self, path: str) -> None:
        self.trainer.save(Path(path))

    def export(self, path: str, shard_bytes: int | None) -> None:
        """This rank's part in writing the model's weights as safetensors files into `path`
        (rank 0 writes; each tensor is gathered on its own)."""
        skip = tied_aliases(self.trainer.model)
        if shard_bytes is None:
            self.trainer.export(Path(path), skip)
        else:
            self.trainer.export(Path(path), skip, shard_bytes)

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

    `model` is the driver's model: it is written once to a temporary directory that every rank
    reads its shards from (on several nodes that directory must be on storage they share).
    An update returns the weights as an `ObjectRef`; `pull_weights` loads the last ones into
    `model` when the driver needs them. `placement` must be started. A rank that
    fails makes the group stop all of its ranks; a dead rank raises `TrainerRankDied`, and any
    other error of a rank is raised as that rank raised it.
    """

    virtual_time = False
    #: `save_checkpoint`'s shards hold the model's weights: a checkpoint needs no other copy
    checkpoint_holds_weights = True

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
        self._latest: Any = None  # the weights of the last update, until pulled
        self.model_dir = tempfile.mkdtemp(prefix="sortedrl-ranks-")
        model.save_pretrained(self.model_dir, safe_serialization=True)
        addr, port = self._call("rendezvous", ranks=[0])[0]
        self._call(
            "setup",
            addr,
            port,
            self.model_dir,
            cfg.trainer,
            cfg.model.device,
            cfg.rollout.temperature,
            cfg.seed,
        )

    # --- the Trainer protocol ------------------------------------------------------------------

    def update(self, batch: UpdateBatch) -> UpdateResult:
        """One update on all ranks; rank 0's statistics and the reference to the full weights
        (CPU tensors under the model's own names) in the object store. `elapsed_s` is this
        call's wall time; `stats["weights_gather_s"]` the time rank 0 took to gather the
        weights, `stats["weight_bytes"]` their size."""
        import ray

        t0 = time.perf_counter()
        results = self._call("update", ray.put(batch))
        result = results[0]
        if not result.skipped:
            self._latest = result.weights
        result.elapsed_s = time.perf_counter() - t0
        result.stats["elapsed_s"] = result.elapsed_s
        return result

    def pull_weights(self) -> None:
        """Bring the driver's model up to date with the last update's weights (once)."""
        import ray

        if self._latest is not None:
            load_into(self.model, ray.get(self._latest))
            self._latest = None

    # --- checkpoints ---------------------------------------------------------------------------

    def save_checkpoint(self, folder: str) -> None:
        """Write the sharded model, optimizer, schedule, counters and mini-batch RNG into
        `folder` (torch.distributed.checkpoint: each rank writes its own part; on several
        nodes `folder` must be on storage they share). Nothing goes into `trainer.pt`."""
        Path(folder).mkdir(parents=True, exist_ok=True)
        self._call("save", str(folder))

    def export_pretrained(self, path: str, shard_bytes: int | None = None) -> None:
        """Write the trained model as a Hugging Face model directory: the ranks write the
        weights (gathered one tensor at a time, rank 0 writing safetensors files of at most
        `shard_bytes`, `sortedrl.training.hf_export.SHARD_BYTES` by default), the driver only
        the config (and generation config). The driver's model is not brought up to date: its
        weights are not read. On several nodes `path` must be on storage rank 0 shares with
        the driver."""
        Path(path).mkdir(parents=True, exist_ok=True)
        self._call("export", str(path), shard_bytes)
        config = self.model.config
        if not getattr(config, "architectures", None):
            config.architectures = [type(self.model).__name__]
        config.save_pretrained(path)
        generation = getattr(self.model, "generation_config", None)
        if generation is not None and self.model.can_generate():
            generation.save_pretrained(path)

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
        load_into(self.model, weights)
        self._latest = None

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
        shutil.rmtree(self.model_dir, ignore_errors=True)

    def _kill_all(self) -> None:
        import ray

        self.closed = True
        for r in self.ranks:
            ray.kill(r)
        shutil.rmtree(self.model_dir, ignore_errors=True)

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
