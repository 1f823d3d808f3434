"""Fixtures shared by the test modules: the warm-start cache, the tiny training run, a local Ray.

Helper modules beside the tests are imported as `tests.<name>` (the repository root is on
pytest's path, `pythonpath` in pyproject.toml), so each is one module object.
"""

from __future__ import annotations

import pytest

# The smallest `sortedrl train` that exercises everything: 16 prompts x 2 responses, updates
# of 2 groups, 16-token responses on an 8-sequence engine, no sampled evaluation. A module
# that needs more says so by appending overrides (a later one wins).
TINY_RUN = (
    "task.train_prompts=16",
    "task.eval_prompts=4",
    "model.warm_start_steps=3",
    "model.warm_start_batch=8",
    "scheduler.group_size=2",
    "rollout.capacity=8",
    "scheduler.update_batch=2",
    "scheduler.rollout_batch=4",
    "scheduler.max_new_tokens=16",
    "eval.sampled=0",
)

# Four logical CPUs on the 2-core machine, so a separate layout of 2 replicas and 2 ranks fits;
# every actor runs one thread (`sortedrl.cluster.runtime.ACTOR_ENV`).
RAY_CPUS = 4


@pytest.fixture
def tiny_run() -> list[str]:
    """The tiny run's overrides, a fresh list each test may extend."""
    return list(TINY_RUN)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A warm-start cache of the test's own, so no test reads a model another one built."""
    path = tmp_path / "cache"
    monkeypatch.setenv("SORTEDRL_CACHE", str(path))
    return path


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray instance for the module, stopped after its last test."""
    ray = pytest.importorskip("ray")
    from sortedrl.cluster.config import ClusterConfig
    from sortedrl.cluster.runtime import start_ray, stop_ray

    started = start_ray(ClusterConfig(backend="ray"), num_cpus=RAY_CPUS)
    yield ray
    stop_ray(started)
