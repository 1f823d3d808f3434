"""Data-parallel GRPO over a torch.distributed group, the model sharded with FSDP2.

Every rank gets the whole update batch and runs the same `GRPOTrainer` code with the same seed,
so every rank makes the same mini-batch split. Within a mini-batch each rank trains its share
of the rows (`token_shares`: the same deterministic split on every rank, balanced by tokens).
The loss is normalised by the whole mini-batch's token and sequence counts, which every rank
knows because it holds the whole batch, so the ranks' losses *add up* to the single-process
loss, and so do their gradients. FSDP2 must therefore reduce gradients by their **sum**: its
default divides by the world size (averaging, right for per-rank-normalised losses, wrong
here), and on some backends it has been reported to sum where it meant to average. We set the
divide factor to 1 and force sum-only collectives on every sharded module (`shard_model`), so
the result does not depend on the backend's defaults. `tests/test_fsdp.py` checks the weights
and the optimizer state against one process on the whole batch, and that a divide factor of
the world size is caught.

The rest keeps the ranks in step and agreeing: the same number of forward/backward passes on
every rank (a rank with fewer micro-batches runs idle passes, since a sharded model gathers
its weights in each), a non-finite loss on any rank skips the step on all, the gradient norm
is the global one, and the statistics are reduced so every rank reports the whole batch's.

gloo on the CPU, NCCL on CUDA (`init_process_group`). Only the CPU path runs in the tests.
"""

from __future__ import annotations

import copy
import os
import time
import warnings
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from sortedrl.scheduling.protocol import UpdateBatch, UpdateResult
from sortedrl.training.config import TrainerConfig
from sortedrl.training.hf_export import SHARD_BYTES, export_weights
from sortedrl.training.loss import TOKEN_MAXES, TOKEN_SUMS, LossOutput
from sortedrl.training.packing import Row
from sortedrl.training.parallel import DataParallel, token_shares
from sortedrl.training.trainer import GRPOTrainer

#: How long a collective may wait for the other ranks before it fails (a dead rank is found
#: by Ray long before this; it bounds a hang if one is not).
COLLECTIVE_TIMEOUT = timedelta(minutes=30)


class ProcessGroupParallel(DataParallel):
    """This process as one rank of the default torch.distributed group (initialised first).

    `device` is where the collectives' tensors live: the CPU for gloo, the rank's GPU for NCCL.
    `gather_s` is the time the last `full_state_dict` took.
    """

    def __init__(self, device: torch.device) -> None:
        if not dist.is_initialized():
            raise RuntimeError("ProcessGroupParallel: init_process_group first")
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.device = device
        self.gather_s = 0.0

    def share(self, rows: Sequence[Row]) -> list[int]:
        return token_shares([r.length for r in rows], self.world)[self.rank]

    def max_over_ranks(self, n: int) -> int:
        t = torch.tensor([n], dtype=torch.long, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def all_true(self, flag: bool) -> bool:
        t = torch.tensor([int(flag)], dtype=torch.long, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())

    def gather_rows(self, rows: list[Row], mine: list[int], attr: str) -> None:
        parts: list[Any] = [None] * self.world
        dist.all_gather_object(parts, {i: getattr(rows[i], attr) for i in mine})
        for part in parts:
            for i, value in part.items():
                setattr(rows[i], attr, value)

    def clip_grad_norm(self, params: list[nn.Parameter], max_norm: float) -> float:
        grads = [p.grad for p in params if p.grad is not None]
        total = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
        if isinstance(total, DTensor):  # each rank holds a partial norm: combine them
            total = total.full_tensor()
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
        return float(total)

    def reduce_step(self, res: dict[str, Any]) -> dict[str, Any]:
        outs: list[LossOutput] = res["outputs"]
        # one SUM over: the counters, the loss parts, the token count and the token sums
        counters = ("padded", "real", "micro", "entropy_sum", "entropy_n")
        parts = ("loss", "pg_loss", "kl_loss", "n_tokens")
        local = [float(res[k]) for k in counters]
        local += [sum(float(getattr(o, k)) for o in outs) for k in parts]
        local += [sum(float(o.sums[k]) for o in outs) for k in TOKEN_SUMS]
        sums = self._all_reduce(local, dist.ReduceOp.SUM)
        peaks = [max((float(o.maxes[k]) for o in outs), default=float("-inf")) for k in TOKEN_MAXES]
        maxes = self._all_reduce(peaks, dist.ReduceOp.MAX)
        total = dict(zip(counters + parts, sums, strict=False))
        token_sums = sums[len(counters) + len(parts) :]

        def t(x: float) -> Tensor:
            return torch.tensor(x, dtype=torch.float64)

        merged = LossOutput(
            loss=t(total["loss"]),
            pg_loss=t(total["pg_loss"]),
            kl_loss=t(total["kl_loss"]),
            n_tokens=t(total["n_tokens"]),
            sums={k: t(v) for k, v in zip(TOKEN_SUMS, token_sums, strict=True)},
            maxes={k: t(v) for k, v in zip(TOKEN_MAXES, maxes, strict=True)},
        )
        reduced = {k: total[k] for k in ("loss", "pg_loss", "kl_loss", "entropy_sum", "entropy_n")}
        reduced.update({k: int(round(total[k])) for k in ("padded", "real", "micro")})
        return {**res, **reduced, "outputs": [merged]}

    def _all_reduce(self, values: list[float], op: Any) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=op)
        return t.cpu().tolist()

    def full_state_dict(self, model: nn.Module) -> dict[str, Tensor] | None:
        t0 = time.perf_counter()
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = get_model_state_dict(model, options=options)
        self.gather_s = time.perf_counter() - t0
        return weights if self.rank == 0 else None


def init_process_group(
    rank: int, world: int, master_addr: str, master_port: int, device: torch.device
) -> None:
    """Join the default group as `rank` of `world`: gloo on the CPU, NCCL on CUDA."""
    os.environ.update(
        MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank), WORLD_SIZE=str(world)
    )
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=COLLECTIVE_TIMEOUT)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks FSDP2 shards one by one: `model.model.layers` (Llama, Qwen, ...)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ValueError(
            f"{type(model).__name__}: no `model.layers` to shard (a transformers causal LM "
            "with decoder layers is expected)"
        )
    return list(layers)


def shard_model(model: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """`fully_shard` each decoder layer, then the root; gradients reduced by their sum."""
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    set_gradient_reduction(model, divide_factor=1.0)
    return model


def set_gradient_reduction(model: nn.Module, divide_factor: float) -> None:
    """Have every sharded module of `model` divide its reduced gradients by `divide_factor`,
    with sum-only collectives (no backend-dependent AVG or PREMUL_SUM)."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(divide_factor)
            module.set_force_sum_reduction_for_comms(True)


class FSDPTrainer:
    """One rank's GRPO trainer: `model` sharded over the default group (initialised first),
    `GRPOTrainer` with `ProcessGroupParallel`, sharded checkpoints. All ranks call every method
    together (each is collective). `update` returns the weights on rank 0 only.

    `model` is a Hugging Face model directory or a model object. From a directory, the model
    is built on the meta device, sharded, and each rank reads only its own shards from the
    safetensors files (`sortedrl.training.sharded_load`): no rank holds the whole model, and
    the reference model of a KL term is loaded the same way. A model object is moved whole to
    `device` before it is sharded, so each rank holds a full copy for a moment."""

    virtual_time = False

    def __init__(
        self,
        model: nn.Module | str | Path,
        config: TrainerConfig,
        device: torch.device,
        *,
        temperature: float = 1.0,
        seed: int = 0,
    ) -> None:
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        ref = None
        if isinstance(model, str | Path):
            from sortedrl.training.sharded_load import load_sharded

            def shard(m: nn.Module) -> nn.Module:
                return shard_model(m, mesh)

            if config.kl_coef > 0:
                ref = load_sharded(model, shard, device, mesh).eval().requires_grad_(False)
            model = load_sharded(model, shard, device, mesh)
            model.train()
        else:
            model = model.to(device)
            if config.kl_coef > 0:
                ref = shard_model(copy.deepcopy(model).eval().requires_grad_(False), mesh)
            model = shard_model(model, mesh)
        self.model = model
        self.dp = ProcessGroupParallel(device)
        self.trainer = GRPOTrainer(
            self.model,
            config,
            ref_model=ref,
            device=device,
            temperature=temperature,
            seed=seed,
            dp=self.dp,
        )

    @property
    def rank(self) -> int:
        return self.dp.rank

    def update(self, batch: UpdateBatch) -> UpdateResult:
        result = self.trainer.update(batch)
        result.stats["weights_gather_s"] = self.dp.gather_s
        return result

    def full_state_dict(self) -> dict[str, Tensor] | None:
        return self.dp.full_state_dict(self.model)

    def _state(self) -> dict[str, Any]:
        return {
            "model": get_model_state_dict(self.model),
            "optimizer": get_optimizer_state_dict(self.model, self.trainer.optimizer),
            "progress": self.trainer.progress_state(),
        }

    def save(self, path: Path) -> None:
        """Write the model, the optimizer (each rank its shards), the schedule, the counters
        and the mini-batch RNG to the directory `path` with torch.distributed.checkpoint.

        Saved before the first optimizer step, the optimizer state is what torch's state-dict
        API makes of an empty AdamW (one zero-gradient step at lr 0: the weights do not move,
        but Adam's step count is 1 from then on)."""
        dcp.save(self._state(), checkpoint_id=str(path))

    def export(self, path: Path, skip: set[str], shard_bytes: int = SHARD_BYTES) -> None:
        """Write the model's weights as a Hugging Face model directory's safetensors files,
        gathered one tensor at a time; rank 0 writes (`sortedrl.training.hf_export`)."""
        export_weights(self.model, path, writer=self.rank == 0, skip=skip, shard_bytes=shard_bytes)

    def load(self, path: Path) -> None:
        """Restore what `save` wrote, resharded to this group (its size may differ)."""
        state = self._state()
        dcp.load(state, checkpoint_id=str(path))
        set_model_state_dict(self.model, state["model"])
        set_optimizer_state_dict(self.model, self.trainer.optimizer, state["optimizer"])
        self.trainer.load_progress_state(state["progress"])


def load_checkpoint_weights(model: nn.Module, path: Path, skip: set[str]) -> None:
    """Fill the whole (unsharded) `model` in this one process with the weights an
    `FSDPTrainer.save` wrote into `path`, leaving the optimizer's part unread. `skip`: names
    tied to another (they are filled through it). Raises ValueError naming what is missing."""
    wanted = {k: v for k, v in model.state_dict().items() if k not in skip}
    state = {"model": wanted}
    try:
        with warnings.catch_warnings():  # one process is the intent: torch warns it assumes so
            warnings.filterwarnings("ignore", message=r"torch\.distributed is disabled")
            dcp.load(state, checkpoint_id=str(path), no_dist=not dist.is_initialized())
    except CheckpointException as e:  # a BaseException: each rank's error (here one) inside
        why = "; ".join(str(exc) for exc, _ in e.failures.values())
        raise ValueError(f"{path}: the model's weights do not load ({why[:300]})") from None
    except (OSError, RuntimeError, ValueError) as e:  # e.g. no .metadata, a damaged file
        raise ValueError(f"{path}: the model's weights do not load ({str(e)[:300]})") from None
    model.load_state_dict(state["model"], strict=False)
