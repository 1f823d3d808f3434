"""Colocated against separate: every policy on 64 H100s with the 32B preset, in virtual time.

Each study below is one `sortedrl simulate` call (the command is printed above its rows): the
`qwen2.5-32b-h100` preset on 64 GPUs with tensor-parallel size 4, the same prompts and
lengths for every row (the preset's long-tailed default, 16k cap), update batch 256 prompts x 8,
rollout batch 640, `max_staleness` 2.

- colocated: 16 replicas x 4 GPUs roll out, and all 64 GPUs train (taking turns);
- separate 12x4+16 (48 GPUs roll out, 16 train) and 8x4+32, for every policy (sync, sorted
  and partial take turns on their own devices; async overlaps the two);
- async on other splits (rollout replicas x 4 + training GPUs = 64).

Prints bubble ratio, goodput, wall time (with ratios against colocated sync, measured in the
same run), wasted token share, max / mean staleness of trained tokens and the share of the
GPU-seconds spent generating or training. The simulated times are virtual; the benchmark's own
wall time is printed last.

Run: python benchmarks/bench_layouts.py [--prompts 4096] [--json runs/layouts.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from sortedrl.engines.costmodel import get_preset
from sortedrl.sim.layout import LayoutSettings
from sortedrl.sim.simulate import SimSettings, build_workload, simulate

PRESET = "qwen2.5-32b-h100"
GPUS = 64
SCHEDULER = {"group_size": 8, "update_batch": 256, "rollout_batch": 640, "max_staleness": 2}
EVERY = ["sync", "sorted-drop", "sorted-keep", "partial"]
# (label, policies, cluster settings): each one `sortedrl simulate` call.
STUDIES: list[tuple[str, list[str], LayoutSettings]] = [
    ("colocated 16x4", EVERY, LayoutSettings(gpus=GPUS, layout="colocated")),
    *[
        (
            f"separate {r}x4+{GPUS - 4 * r}",
            [*EVERY, "async"],
            LayoutSettings(gpus=GPUS, layout="separate", rollout_replicas=r),
        )
        for r in (12, 8)
    ],
    *[
        (f"separate {r}x4+{GPUS - 4 * r}", ["async"], LayoutSettings(gpus=GPUS, rollout_replicas=r))
        for r in (4, 6, 7, 9, 10, 14)
    ],
]


def command(policies: list[str], cluster: LayoutSettings, prompts: int) -> str:
    opts = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in cluster.given().items())
    sched = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in SCHEDULER.items())
    return (
        f"sortedrl simulate --preset {PRESET} --policies {','.join(policies)} {opts} "
        f"--prompts {prompts} {sched} --seed 0"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=4096)
    ap.add_argument("--json", default=None, help="write every row here")
    args = ap.parse_args()
    spec = get_preset(PRESET)
    workload = build_workload(
        trace=None, lengths=None, prompts=args.prompts, group_size=8, spec=spec, seed=0
    )
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    base: dict[str, Any] | None = None
    header = (
        f"{'layout':<18} {'policy':<12} {'bubble':>7} {'goodput':>8} {'x':>5} {'wall s':>7} "
        f"{'x':>5} {'wasted':>7} {'stale':>10} {'GPU busy':>8}"
    )
    for label, policies, cluster in STUDIES:
        s = SimSettings(
            preset=PRESET,
            policies=policies,
            prompts=args.prompts,
            scheduler=dict(SCHEDULER),
            cluster=cluster,
        )
        doc = simulate(s, workload)
        print(f"\n$ {command(policies, cluster, args.prompts)}\n{header}")
        for name, p in doc["policies"].items():
            base = base or p  # colocated sync, the first row
            rows.append({"layout": label, "policy": name, **_row(p)})
            print(
                f"{label:<18} {name:<12} {p['bubble_ratio']:>7.1%} "
                f"{p['goodput_tokens_per_s']:>8.0f} "
                f"{p['goodput_tokens_per_s'] / base['goodput_tokens_per_s']:>5.2f} "
                f"{p['wall_time_s']:>7.0f} {p['wall_time_s'] / base['wall_time_s']:>5.2f} "
                f"{p['wasted_token_share']:>7.1%} "
                f"{p['max_staleness_trained']:>4} / {p['mean_staleness_trained']:.2f} "
                f"{p['gpu_busy_share']:>8.1%}",
                flush=True,
            )
    elapsed = time.perf_counter() - start
    print(f"\nratios (x) against colocated sync; benchmark wall time {elapsed:.0f} s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"rows": rows, "scheduler": SCHEDULER}, indent=1))


def _row(p: dict[str, Any]) -> dict[str, Any]:
    keys = (
        "bubble_ratio",
        "goodput_tokens_per_s",
        "wall_time_s",
        "wasted_token_share",
        "max_staleness_trained",
        "mean_staleness_trained",
        "gpu_busy_share",
        "rollout_gpus",
        "train_gpus",
        "capacity",
        "updates",
    )
    return {k: p[k] for k in keys}


if __name__ == "__main__":
    main()
