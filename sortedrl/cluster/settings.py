"""What `cluster/` reads of a run's settings, declared as a protocol so that the Ray layer
depends only on the sections below it, never on the assembled `TrainConfig` above it (which
satisfies it as it is)."""

from __future__ import annotations

from typing import Protocol

from sortedrl.cluster.config import ClusterConfig
from sortedrl.engines.config import ModelConfig, RolloutConfig
from sortedrl.scheduling.config import SchedulerConfig
from sortedrl.tasks.config import TaskConfig
from sortedrl.training.config import TrainerConfig


class RunSettings(Protocol):
    seed: int
    model: ModelConfig
    task: TaskConfig
    rollout: RolloutConfig
    scheduler: SchedulerConfig
    trainer: TrainerConfig
    cluster: ClusterConfig
    max_engine_failures: int
