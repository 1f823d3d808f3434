"""The trainer: GRPO loss (decoupled for stale tokens), length-sorted packing, SFT warm start.

Names are imported on first use, so that reading settings (`sortedrl.training.config`) does not
import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "GRPOTrainer": "trainer",
    "build_rows": "rows",
    "lr_factor": "trainer",
    "TrainerConfig": "config",
    "aggregate": "loss",
    "group_advantages": "loss",
    "kl_k3": "loss",
    "policy_loss": "loss",
    "plan_micro_batches": "packing",
    "encode_example": "sft",
    "supervised_warm_start": "sft",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
