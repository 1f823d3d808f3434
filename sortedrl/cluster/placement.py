"""Placement of replicas and trainer ranks in one Ray placement group.

`colocated`: bundle k holds replica k and rank k (as many bundles as the larger of the two
counts); each asks for half of the bundle, so the two share its devices and take turns, as
the colocated policies (sync, sorted, partial) use them. `separate`: one bundle per replica and
one per rank, so rollout and training have devices of their own (async). The group is packed
onto as few nodes as fit it.
"""

from __future__ import annotations

from typing import Any

from sortedrl.cluster.config import ClusterConfig, Layout
from sortedrl.errors import ConfigError

#: Seconds to wait for the cluster to grant the placement group before giving up.
READY_TIMEOUT_S = 120.0


def bundles(cluster: ClusterConfig, layout: Layout, device: str) -> list[dict[str, float]]:
    """The placement group's bundles: replicas' first, then ranks' (separate), or shared."""
    rc, rg = cluster.replica_cpus, cluster.gpus_per_replica(device)
    kc, kg = cluster.rank_cpus, cluster.gpus_per_rank(device)
    if layout == "separate":
        rep = [_bundle(rc, rg)] * cluster.rollout_replicas
        return rep + [_bundle(kc, kg)] * cluster.trainer_ranks
    if max(rg, kg) > 1:
        raise ConfigError(
            f"cluster.layout=colocated: a replica ({rg:g} GPUs) and a rank ({kg:g} GPUs) share a "
            "bundle, which Ray can split only within one GPU; use cluster.layout=separate for "
            "tensor_parallel_size > 1"
        )
    n = max(cluster.rollout_replicas, cluster.trainer_ranks)
    return [_bundle(max(rc, kc), max(rg, kg))] * n


def _bundle(cpus: float, gpus: float) -> dict[str, float]:
    b = {"CPU": float(cpus)}
    if gpus > 0:
        b["GPU"] = float(gpus)
    return b


class Placement:
    """The run's placement group and the Ray options that put each actor in its bundle."""

    def __init__(self, cluster: ClusterConfig, policy: str, device: str) -> None:
        self.cluster = cluster
        self.layout: Layout = cluster.resolved_layout(policy)
        self.device = device
        self.bundles = bundles(cluster, self.layout, device)
        self.group: Any = None

    def start(self) -> None:
        """Reserve the bundles; a cluster too small for them is a clear error."""
        import ray
        from ray.util.placement_group import placement_group

        self.group = placement_group(self.bundles, strategy="PACK")
        ready, _ = ray.wait([self.group.ready()], timeout=READY_TIMEOUT_S)
        if not ready:
            have = ray.cluster_resources()
            self.close()
            raise ConfigError(
                f"cluster: the Ray cluster did not grant {len(self.bundles)} bundles "
                f"{self.bundles} ({self.layout} layout) in {READY_TIMEOUT_S:.0f} s; it has "
                f"{ {k: v for k, v in have.items() if k in ('CPU', 'GPU')} }. Lower "
                "cluster.rollout_replicas, trainer_ranks or their cpus/gpus"
            )

    def replica_options(self, i: int) -> dict[str, Any]:
        c = self.cluster
        return self._options(i, c.replica_cpus, c.gpus_per_replica(self.device))

    def rank_options(self, j: int) -> dict[str, Any]:
        c = self.cluster
        index = j if self.layout == "colocated" else c.rollout_replicas + j
        return self._options(index, c.rank_cpus, c.gpus_per_rank(self.device))

    def _options(self, index: int, cpus: float, gpus: float) -> dict[str, Any]:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if self.group is None:
            raise RuntimeError("Placement.start() first")
        share = 0.5 if self.layout == "colocated" else 1.0
        return {
            "num_cpus": cpus * share,
            "num_gpus": gpus * share,
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                placement_group=self.group, placement_group_bundle_index=index
            ),
        }

    def close(self) -> None:
        if self.group is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.group)
            self.group = None
