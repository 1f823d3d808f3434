"""The backend a run gets (`cluster.backend`): `local`, one engine and one trainer in this
process (the default), or `ray` (`sortedrl.cluster.backend.RayBackend`). Both are a
`sortedrl.scheduling.protocol.Backend`."""

from __future__ import annotations

from typing import Any

from sortedrl.config import TrainConfig
from sortedrl.engines.factory import build_engine
from sortedrl.scheduling.protocol import Backend, Engine, Trainer


class LocalBackend:
    """One engine and one trainer in this process (the default)."""

    engine_restarts_itself = False  # the run loop rebuilds a failed engine

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg

    def trainer(self, model: Any) -> Trainer:
        from sortedrl.training.trainer import GRPOTrainer

        cfg = self.cfg
        return GRPOTrainer(
            model,
            cfg.trainer,
            device=cfg.model.device,
            temperature=cfg.rollout.temperature,
            seed=cfg.seed,
        )

    def engine(
        self, model: Any, tokenizer: Any, version: int, problems_by_id: dict[str, Any]
    ) -> Engine:
        cfg = self.cfg
        return build_engine(cfg.rollout, cfg.model, cfg.seed, model, tokenizer, version)

    def evaluator(self, engine: Engine) -> None:
        """Evaluation runs here, on the driver's model."""
        return None

    def close(self) -> None:
        pass


def make_backend(cfg: TrainConfig) -> Backend:
    """The backend `cluster.backend` names."""
    if cfg.cluster.backend == "ray":
        from sortedrl.cluster.backend import RayBackend

        return RayBackend(cfg)
    return LocalBackend(cfg)
