"""A local Ray instance for a test module: `from tests.ray_cluster import ray_local` and use
the fixture. Four logical CPUs on this 2-core machine, so a separate layout of 2 replicas and 2
ranks fits; every actor runs one thread (`sortedrl.cluster.runtime.ACTOR_ENV`)."""

from __future__ import annotations

import pytest

from sortedrl.cluster.config import ClusterConfig
from sortedrl.cluster.runtime import start_ray, stop_ray

RAY_CPUS = 4


@pytest.fixture(scope="module")
def ray_local():
    import ray

    started = start_ray(ClusterConfig(backend="ray"), num_cpus=RAY_CPUS)
    yield ray
    stop_ray(started)
