"""FSDP2 trainer ranks on Ray against the local trainer: the cost of one update, and of
gathering the full weights on rank 0 for the rollout engines.

The same synthetic update batches (the default's shape: `--groups` groups of `--group-size`
responses, lognormal lengths capped at `--max-new-tokens`) go through

1. `GRPOTrainer` in this process (the `local` backend), and
2. `RayTrainerGroup` with `--ranks` ranks in a local Ray (gloo, one thread per rank),

on the embedded default model. It prints the median update wall time of each (after one
warm-up update), their ratio, and rank 0's median `weights_gather_s` (part of the group's
time). On a 2-core machine the ranks cannot be faster: this measures the overhead, e.g.

    python benchmarks/bench_trainer_ranks.py --ranks 2 --updates 4
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from sortedrl.cluster.config import ClusterConfig  # noqa: E402
from sortedrl.cluster.placement import Placement  # noqa: E402
from sortedrl.cluster.runtime import start_ray, stop_ray  # noqa: E402
from sortedrl.cluster.trainers import RayTrainerGroup  # noqa: E402
from sortedrl.config import TrainConfig  # noqa: E402
from sortedrl.models.tiny import build_tiny_model, num_parameters  # noqa: E402
from sortedrl.scheduling.protocol import TrainGroup, TrainSample, UpdateBatch  # noqa: E402
from sortedrl.training.trainer import GRPOTrainer  # noqa: E402

VOCAB = 48


def make_batch(args, version: int, rng: random.Random) -> UpdateBatch:
    groups = []
    for g in range(args.groups):
        prompt = [1] + [rng.randrange(4, VOCAB) for _ in range(rng.randint(8, 16))]
        samples = []
        for i in range(args.group_size):
            n = min(args.max_new_tokens, max(1, int(rng.lognormvariate(3.0, 0.6))))
            samples.append(
                TrainSample(
                    sample_index=i,
                    n_tokens=n,
                    finish_reason="length" if n == args.max_new_tokens else "stop",
                    version_spans=[(version, n)],
                    reward=float(rng.random() < 0.5),
                    token_ids=[rng.randrange(4, VOCAB) for _ in range(n)],
                )
            )
        groups.append(TrainGroup(f"p{g}", len(prompt), samples, prompt_token_ids=prompt))
    return UpdateBatch(version=version, groups=groups)


def timed(trainer, batches: list[UpdateBatch]) -> tuple[list[float], list[float]]:
    walls, gathers = [], []
    for batch in batches:
        t0 = time.perf_counter()
        result = trainer.update(batch)
        walls.append(time.perf_counter() - t0)
        gathers.append(result.stats.get("weights_gather_s", float("nan")))
    return walls[1:], gathers[1:]  # the first is the warm-up


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--updates", type=int, default=4, help="timed updates (plus one warm-up)")
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = TrainConfig(
        seed=args.seed, cluster=ClusterConfig(backend="ray", trainer_ranks=args.ranks)
    )
    rng = random.Random(args.seed)
    batches = [make_batch(args, v, rng) for v in range(args.updates + 1)]
    tokens = statistics.mean(b.num_tokens for b in batches)
    model = build_tiny_model(VOCAB, seed=args.seed).train()
    print(f"model: {num_parameters(model):,} parameters; {tokens:.0f} response tokens/update")

    local_walls, _ = timed(GRPOTrainer(model, cfg.trainer, seed=args.seed), batches)

    started = start_ray(cfg.cluster, num_cpus=max(2, args.ranks))
    placement = Placement(cfg.cluster, policy="sync", device="cpu")
    placement.start()
    group = RayTrainerGroup(cfg, build_tiny_model(VOCAB, seed=args.seed).train(), placement)
    try:
        ray_walls, gathers = timed(group, batches)
    finally:
        group.close()
        placement.close()
        stop_ray(started)

    local, ray_ = statistics.median(local_walls), statistics.median(ray_walls)
    print(f"local trainer        update {local:.3f} s (median of {len(local_walls)})")
    print(f"ray, {args.ranks} rank(s)      update {ray_:.3f} s  ({ray_ / local:.2f}x local)")
    print(f"  rank 0 weight gather      {statistics.median(gathers) * 1e3:.1f} ms per update")


if __name__ == "__main__":
    main()
