"""The trainer: GRPO loss (decoupled for stale tokens), length-sorted packing, SFT warm start."""

from sortedrl.training.config import TrainerConfig
from sortedrl.training.loss import aggregate, group_advantages, kl_k3, policy_loss
from sortedrl.training.packing import plan_micro_batches
from sortedrl.training.sft import encode_example, supervised_warm_start
from sortedrl.training.trainer import GRPOTrainer, build_rows, lr_factor

__all__ = [
    "GRPOTrainer",
    "TrainerConfig",
    "aggregate",
    "build_rows",
    "encode_example",
    "group_advantages",
    "kl_k3",
    "lr_factor",
    "plan_micro_batches",
    "policy_loss",
    "supervised_warm_start",
]
