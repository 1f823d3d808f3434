"""The Ray backend (`cluster.backend=ray`, a `sortedrl.scheduling.protocol.Backend`): engine
replicas and FSDP2 trainer ranks in Ray actors. `sortedrl.commands.backend` holds the local
one and picks between them.

    backend = RayBackend(cfg)            # connects (or starts Ray), reserves the devices
    trainer = backend.trainer(model)     # a RayTrainerGroup of ranks
    engine = backend.engine(model, tokenizer, version, problems_by_id)   # a replica pool
    ...
    backend.close()                      # kills the actors, frees the devices
"""

from __future__ import annotations

from typing import Any

from sortedrl.cluster.settings import RunSettings
from sortedrl.scheduling.protocol import Engine, Trainer


class RayBackend:
    """`cluster.rollout_replicas` engine replicas and `cluster.trainer_ranks` FSDP2 ranks as
    Ray actors in one placement group (`sortedrl.cluster.placement`)."""

    engine_restarts_itself = True  # the replica pool restarts its replicas

    def __init__(self, cfg: RunSettings) -> None:
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
        replicas: `ReplicaPool.evaluate`), so the driver needs no current weights to
        evaluate; None for vLLM replicas, whose evaluation runs on the driver's model."""
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


def evaluates_on_replicas(cfg: RunSettings) -> bool:
    """Whether a run's evaluations run on the Ray replicas rather than in the driver."""
    return cfg.cluster.backend == "ray" and cfg.rollout.engine == "transformers"
