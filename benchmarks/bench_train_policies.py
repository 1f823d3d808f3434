"""Real training, policy against policy: the same data, seeds, model and update batch.

Runs `sortedrl train` once per policy and seed (sync, sorted with keep and with drop, partial,
async; `sorted-keep` is the default sorted, with update pacing and its own rollout batch
(`rollout_batch: auto`); `sorted-fixed32` is it with the fixed R = 32 that was the default
before; `sorted-unpaced` turns pacing off; `sorted-paced` adds longest-predicted-first submission)
on the embedded default (or the overrides you pass) and prints, per policy, the mean and the
standard deviation over the seeds of bubble ratio, goodput (trained tokens and samples per
second of the run loop) and its ratio to `sync` of the same seed, wasted tokens, staleness,
the update's share of the loop and held-out accuracy after training.

Run: python benchmarks/bench_train_policies.py [--out runs/policies] [--seeds 1,2,3]
     [--policies sync,sorted-keep] [KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from sortedrl.commands.train import train
from sortedrl.config import load_config

POLICIES = {
    "sync": ["scheduler.policy=sync"],
    "sorted-keep": ["scheduler.policy=sorted", "scheduler.cache=keep"],
    # sorted with the fixed rollout batch that was the default before `auto` (4 U)
    "sorted-fixed32": [
        "scheduler.policy=sorted",
        "scheduler.cache=keep",
        "scheduler.rollout_batch=32",
    ],
    "sorted-unpaced": [
        "scheduler.policy=sorted",
        "scheduler.cache=keep",
        "scheduler.update_pacing=false",
    ],
    "sorted-paced": [
        "scheduler.policy=sorted",
        "scheduler.cache=keep",
        "scheduler.update_pacing=true",
        "scheduler.submit_order=longest_predicted",
    ],
    "sorted-keep-round": [
        "scheduler.policy=sorted",
        "scheduler.cache=keep",
        "scheduler.admission=round",
    ],
    "sorted-drop": ["scheduler.policy=sorted", "scheduler.cache=drop"],
    "partial": ["scheduler.policy=partial"],
    "async": ["scheduler.policy=async"],
}

COLUMNS = [
    ("bubble_ratio", "bubble", "{:.1%}"),
    ("goodput_samples_per_s", "smp/s", "{:.1f}"),
    ("goodput_vs_sync", "vs sync", "{:.2f}"),
    ("wasted_token_share", "wasted", "{:.1%}"),
    ("mean_staleness_trained", "stale", "{:.2f}"),
    ("update_share", "update", "{:.0%}"),
    ("eval_after", "acc after", "{:.1%}"),
]


def _row(s: dict) -> dict:
    loop = s["loop_time_s"]
    return {
        "bubble_ratio": s["bubble_ratio"],
        "loop_time_s": loop,
        "rollout_time_s": s["rollout_time_s"],
        "update_time_s": s["update_time_s"],
        "update_share": s["update_time_s"] / loop if loop else 0.0,
        "goodput_tokens_per_s": s["tokens_trained"] / loop,
        "goodput_samples_per_s": s["samples_trained"] / loop,
        "wasted_token_share": s["wasted_token_share"],
        "max_staleness_trained": s["max_staleness_trained"],
        "mean_staleness_trained": s["mean_staleness_trained"],
        "samples_trained": s["samples_trained"],
        "eval_before": s["eval_before"]["accuracy"],
        "eval_after": s["eval_after"]["accuracy"],
    }


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/policies")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--seeds", default="0", help="comma-separated seeds, e.g. 1,2,3")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    names = args.policies.split(",")
    unknown = [n for n in names if n not in POLICIES]
    if unknown:
        ap.error(f"unknown policies {unknown}; known: {', '.join(POLICIES)}")
    seeds = [int(x) for x in args.seeds.split(",")]
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for seed in seeds:
        for name in names:
            cfg = load_config(None, [*args.overrides, f"seed={seed}", *POLICIES[name]])
            out = Path(args.out) / f"{name}-seed{seed}"
            row = _row(train(cfg, out, progress=False, overwrite=True))  # a rerun replaces
            row["seed"] = seed
            runs[name].append(row)
            print(name, json.dumps(row), flush=True)
        if "sync" in runs:  # ratios against sync of the same seed
            base = runs["sync"][-1]["goodput_samples_per_s"]
            for name in names:
                r = runs[name][-1]
                r["goodput_vs_sync"] = r["goodput_samples_per_s"] / base
    print(f"\n{len(seeds)} seed(s) {seeds}: mean ± std")
    print(f"{'policy':18s}" + "".join(f"{h:>18s}" for _, h, _ in COLUMNS))
    for name, rows in runs.items():
        cells = []
        for key, _, fmt in COLUMNS:
            if key not in rows[0]:  # no sync in this run
                cells.append("n/a")
                continue
            m, sd = _mean_std([r[key] for r in rows])
            cells.append(f"{fmt.format(m)} ± {fmt.format(sd)}")
        print(f"{name:18s}" + "".join(f"{c:>18s}" for c in cells))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "policies.json").write_text(json.dumps(runs, indent=2))


if __name__ == "__main__":
    main()
