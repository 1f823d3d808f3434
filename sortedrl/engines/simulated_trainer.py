"""A trainer in virtual time: each update takes what the roofline cost model says."""

from __future__ import annotations

from sortedrl.engines.costmodel import ClusterSpec, CostModel, resolve_preset
from sortedrl.errors import ConfigError
from sortedrl.scheduling.protocol import UpdateBatch, UpdateResult


class CostModelTrainer:
    """Implements `sortedrl.scheduling.protocol.Trainer` in virtual time from the cost model.

    `gpus` (or `gpu_fraction` of the preset's GPUs) is what training runs on: all of them when
    colocated, the training share when an async run splits the GPUs.
    """

    virtual_time = True

    def __init__(
        self,
        preset: str | ClusterSpec,
        gpus: int | None = None,
        gpu_fraction: float | None = None,
        extra_forward_passes: int | None = None,
    ):
        spec = resolve_preset(preset)
        if gpus is not None and gpu_fraction is not None:
            raise ConfigError("give the trainer either gpus or gpu_fraction, not both")
        if gpu_fraction is not None:
            if not 0 < gpu_fraction <= 1:
                raise ConfigError(f"gpu_fraction must be in (0, 1], got {gpu_fraction}")
            gpus = max(1, round(spec.gpus * gpu_fraction))
        self.gpus = spec.gpus if gpus is None else gpus
        if self.gpus < 1:
            raise ConfigError(f"the trainer needs at least one GPU, got {self.gpus}")
        # Validate the preset itself (weights fit, KV room) with its own GPU count.
        self.cost = CostModel(spec)
        self.extra_forward_passes = extra_forward_passes

    def update(self, batch: UpdateBatch) -> UpdateResult:
        tokens = 0
        sum_sq = 0.0
        samples = 0
        for g in batch.groups:
            for s in g.samples:
                seq = g.prompt_len + s.n_tokens
                tokens += seq
                sum_sq += seq * seq
                samples += 1
        elapsed = self.cost.update_time(
            tokens, sum_sq, gpus=self.gpus, extra_forward_passes=self.extra_forward_passes
        )
        return UpdateResult(
            elapsed_s=elapsed,
            weights=batch.version + 1,
            stats={"tokens": float(tokens), "samples": float(samples)},
        )
