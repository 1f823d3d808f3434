"""What `GRPOTrainer` asks of data parallelism, and its single-process answer.

`DataParallel` is one process alone; `sortedrl.training.distributed.ProcessGroupParallel` is one
rank of a torch.distributed group. This module imports nothing of torch.distributed, so the
single-process trainer does not pay for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from sortedrl.training.packing import Row


def token_shares(lengths: Sequence[int], world: int) -> list[list[int]]:
    """Split row indices into `world` shares of about equal tokens, the same on every rank.

    Longest row first (ties by index), each to the share with the fewest tokens so far (ties to
    the lower rank); indices ascending within a share. A share may be empty.
    """
    shares: list[list[int]] = [[] for _ in range(world)]
    load = [0] * world
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        shares[r].append(i)
        load[r] += lengths[i]
    return [sorted(s) for s in shares]


class DataParallel:
    """One process alone: what `GRPOTrainer` uses outside a group. Every method is the identity
    (all rows are this process's, counts and flags are its own), so the trainer's arithmetic is
    exactly the single-process one."""

    rank = 0
    world = 1

    def share(self, rows: Sequence[Row]) -> list[int]:
        """Indices of the rows of a mini-batch this rank trains."""
        return list(range(len(rows)))

    def max_over_ranks(self, n: int) -> int:
        return n

    def all_true(self, flag: bool) -> bool:
        return flag

    def gather_rows(self, rows: list[Row], mine: list[int], attr: str) -> None:
        """Give every rank the `attr` of the rows the other ranks filled in."""

    def clip_grad_norm(self, params: list[nn.Parameter], max_norm: float) -> float:
        """Clip the gradients to the global norm `max_norm`; returns the norm before clipping."""
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))

    def reduce_step(self, res: dict[str, Any]) -> dict[str, Any]:
        """One optimizer step's statistics, made the whole mini-batch's on every rank."""
        return res

    def full_state_dict(self, model: nn.Module) -> dict[str, Tensor] | None:
        """The whole model's weights (on rank 0; None on the others)."""
        return model.state_dict()
