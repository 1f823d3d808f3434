"""Weight sync of the Ray replica pool: seconds per update for N replicas of the embedded
tiny model.

Starts a local Ray instance and a pool of `--replicas` transformers replicas, then loads
`--updates` fresh state dicts into it (what the run does after every update), with each
weight-sync path:

- `object_store`: the state dict is put into the object store once and every replica loads
  that one object, concurrently;
- `broadcast`: replica 0 loads it from the object store and sends it tensor by tensor to the
  others over their own process group (gloo here; NCCL on GPUs, not run on this machine).

The baseline, measured in the same run, is one local engine's `load_weights` of the same
state dict (an in-process copy, what `cluster.backend=local` does). Prints the median seconds
per update of each and the ratio to the baseline. Example (about a minute on 2 CPU cores):

    python benchmarks/bench_weight_sync.py --replicas 2 --updates 10
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from sortedrl.cluster.config import ClusterConfig  # noqa: E402
from sortedrl.cluster.placement import Placement  # noqa: E402
from sortedrl.cluster.replicas import ReplicaPool, replica_spawner  # noqa: E402
from sortedrl.cluster.runtime import start_ray, stop_ray  # noqa: E402
from sortedrl.config import TrainConfig  # noqa: E402
from sortedrl.engines.transformers_engine import TransformersEngine  # noqa: E402
from sortedrl.models.tiny import build_char_tokenizer, build_tiny_model, num_parameters  # noqa: E402
from sortedrl.tasks.reverse import ALPHABET  # noqa: E402


def fresh_weights(model, step: int) -> dict[str, torch.Tensor]:
    """A new state dict, as an update makes (every tensor changed)."""
    return {k: v.detach() + 1e-3 * step for k, v in model.state_dict().items()}


def timed_syncs(pool, model, updates: int) -> list[float]:
    return [pool.load_weights(fresh_weights(model, u), u) for u in range(1, updates + 1)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--updates", type=int, default=10)
    ap.add_argument("--size", default="default", help="tiny model size (sortedrl.models.tiny)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    tok = build_char_tokenizer(ALPHABET)
    model = build_tiny_model(len(tok), seed=0, size=args.size)
    mib = sum(v.numel() * v.element_size() for v in model.state_dict().values()) / 2**20
    print(f"model: {num_parameters(model) / 1e6:.2f}M parameters, state dict {mib:.1f} MiB")

    local = TransformersEngine(copy.deepcopy(model), tok, capacity=4)
    base = [local.load_weights(fresh_weights(model, u), u) for u in range(1, args.updates + 1)]

    cluster = ClusterConfig(backend="ray", rollout_replicas=args.replicas)
    started = start_ray(cluster, num_cpus=2 * args.replicas)
    placement = Placement(cluster, "sorted", "cpu")
    placement.start()
    try:
        cfg = TrainConfig(cluster=cluster)
        spawn = replica_spawner(cfg, model, tok, 0, placement, None)
        results = {"local load_weights (baseline)": base}
        for mode in ("object_store", "broadcast"):
            pool = ReplicaPool(spawn, args.replicas, 0, weight_sync=mode)
            try:
                pool.load_weights(fresh_weights(model, 0), 0)  # warm: first transfers
                t0 = time.perf_counter()
                results[f"pool {mode} x{args.replicas}"] = timed_syncs(pool, model, args.updates)
                print(f"{mode}: {time.perf_counter() - t0:.2f} s for {args.updates} updates")
            finally:
                pool.close()
    finally:
        placement.close()
        stop_ray(started)
    b = statistics.median(base)
    print(f"\n{'path':<36} {'median s/update':>16} {'x baseline':>11}")
    for name, secs in results.items():
        m = statistics.median(secs)
        print(f"{name:<36} {m:>16.4f} {m / b:>11.1f}")


if __name__ == "__main__":
    main()
