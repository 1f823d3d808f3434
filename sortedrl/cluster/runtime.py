"""Connecting to Ray: an existing cluster (`cluster.address`) or a local one for the run."""

from __future__ import annotations

import os
from typing import Any

from sortedrl.cluster.config import ClusterConfig
from sortedrl.errors import ConfigError

#: Environment of every actor: one thread per process unless the user set OMP_NUM_THREADS
#: (a replica and a rank sharing a bundle would otherwise each spin up a thread per core).
ACTOR_ENV = {
    "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    "TOKENIZERS_PARALLELISM": "false",
}


def start_ray(cluster: ClusterConfig, num_cpus: float | None = None) -> bool:
    """Connect to `cluster.address`, or start a local Ray instance. Returns True when this
    call started (and so must later stop) Ray; an already initialised Ray is used as it is."""
    try:
        import ray
    except ImportError:
        raise ConfigError(
            "cluster.backend=ray needs Ray: pip install -e '.[ray]' (make test installs it)"
        ) from None
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {
        "include_dashboard": False,
        "runtime_env": {"env_vars": dict(ACTOR_ENV)},
        "logging_level": "warning",
    }
    if cluster.address:
        try:
            ray.init(address=cluster.address, **kwargs)
        except ConnectionError as e:
            raise ConfigError(f"cluster.address={cluster.address!r}: {e}") from None
    else:
        ray.init(num_cpus=num_cpus, **kwargs)
    return True


def stop_ray(started: bool) -> None:
    if started:
        import ray

        ray.shutdown()
