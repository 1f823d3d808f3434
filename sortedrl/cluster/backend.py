"""Where a training run's engine and trainer live: `local` (this process) or `ray` (replicas
and FSDP2 ranks in Ray actors). `sortedrl train` asks its backend for the two and closes it at
the end; the controller and the run loop do not know which one they got.

    backend = make_backend(cfg)          # ray: connects (or starts Ray), reserves the devices
    trainer = backend.trainer(model)     # GRPOTrainer, or a RayTrainerGroup of ranks
    engine = backend.engine(model, tokenizer, version, problems_by_id)
    ...
    backend.close()                      # kills the actors, frees the devices

A trainer that has `save_checkpoint(dir)` / `load_checkpoint(dir)` (the Ray group) writes its
part of a checkpoint sharded with torch.distributed.checkpoint; the local one's state travels in
`trainer.pt`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sortedrl.engines.factory import build_engine

if TYPE_CHECKING:
    from sortedrl.config import TrainConfig
    from sortedrl.scheduling.protocol import Engine, Trainer


class LocalBackend:
    """One engine and one trainer in this process (the default)."""

    #: whether the engine replaces its own failed parts (the run loop restarts a local one)
    engine_restarts_itself = False

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
        return build_engine(self.cfg, model, tokenizer, version)

    def evaluator(self, engine: Engine) -> None:
        """Evaluation runs here, on the driver's model."""
        return None

    def close(self) -> None:
        pass


class RayBackend:
    """`cluster.rollout_replicas` engine replicas and `cluster.trainer_ranks` FSDP2 ranks as
    Ray actors in one placement group (`sortedrl.cluster.placement`)."""

    engine_restarts_itself = True  # the replica pool restarts its replicas

    def __init__(self, cfg: TrainConfig) -> None:
        from sortedrl.cluster.placement import Placement
        from sortedrl.cluster.runtime import start_ray

        self.cfg = cfg
        self.started = start_ray(cfg.cluster)
        self.placement = Placement(cfg.cluster, cfg.scheduler.policy, cfg.model.device)
        try:
            self.placement.start()
        except BaseException:
            self._stop_ray()
            raise
        self._trainer: Any = None
        self._engine: Any = None
        self._replica_model_dir: str | None = None

    def trainer(self, model: Any) -> Trainer:
        from sortedrl.cluster.trainers import RayTrainerGroup

        self._trainer = RayTrainerGroup(self.cfg, model, self.placement)
        return self._trainer

    def engine(
        self, model: Any, tokenizer: Any, version: int, problems_by_id: dict[str, Any]
    ) -> Engine:
        import tempfile

        from sortedrl.cluster.replicas import build_replica_pool

        # The replicas (and their restarts) load the weights from files written once here,
        # not from a copy of the model in the object store.
        if self._replica_model_dir is None:
            self._replica_model_dir = tempfile.mkdtemp(prefix="sortedrl-replicas-")
        model.save_pretrained(self._replica_model_dir, safe_serialization=True)
        self._engine = build_replica_pool(
            self.cfg, self._replica_model_dir, tokenizer, version, self.placement, problems_by_id
        )
        return self._engine

    def evaluator(self, engine: Engine) -> Any:
        """`generate(requests, temperature, top_p, seed)` on the replicas (transformers
        replicas), so the driver needs no current weights to evaluate; None for vLLM
        replicas, whose evaluation runs on the driver's model."""
        return engine.evaluate if evaluates_on_replicas(self.cfg) else None  # type: ignore[attr-defined]

    def close(self) -> None:
        try:
            self._close_engine()
            if self._trainer is not None:
                self._trainer.close()
                self._trainer = None
            self.placement.close()
        finally:
            self._stop_ray()
            if self._replica_model_dir is not None:
                import shutil

                shutil.rmtree(self._replica_model_dir, ignore_errors=True)
                self._replica_model_dir = None

    def _close_engine(self) -> None:
        if self._engine is not None:
            try:
                self._engine.close()
            except Exception as e:  # a failed pool may not close cleanly; go on
                print(f"warning: closing the replica pool: {e}")
            self._engine = None

    def _stop_ray(self) -> None:
        from sortedrl.cluster.runtime import stop_ray

        stop_ray(self.started)


def evaluates_on_replicas(cfg: TrainConfig) -> bool:
    """Whether the run's evaluations run on the Ray replicas rather than in the driver."""
    return cfg.cluster.backend == "ray" and cfg.rollout.engine == "transformers"


def make_backend(cfg: TrainConfig) -> LocalBackend | RayBackend:
    """The backend `cluster.backend` names."""
    return RayBackend(cfg) if cfg.cluster.backend == "ray" else LocalBackend(cfg)
