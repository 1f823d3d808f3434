"""Real training, policy against policy: the same data, seeds, model and update batch.

Runs `sortedrl train` once per policy (sync, sorted with keep and with drop, partial, async)
on the embedded default (or the overrides you pass) and prints bubble ratio, goodput (trained
tokens and samples per second of the run loop), wasted tokens, staleness and held-out accuracy
before and after, with ratios against `sync` measured in the same run.

Run: python benchmarks/bench_train_policies.py [--out runs/policies] [KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sortedrl.commands.train import train
from sortedrl.config import load_config

POLICIES = {
    "sync": ["scheduler.policy=sync"],
    "sorted-keep": ["scheduler.policy=sorted", "scheduler.cache=keep"],
    "sorted-keep-round": [
        "scheduler.policy=sorted",
        "scheduler.cache=keep",
        "scheduler.admission=round",
    ],
    "sorted-drop": ["scheduler.policy=sorted", "scheduler.cache=drop"],
    "partial": ["scheduler.policy=partial"],
    "async": ["scheduler.policy=async"],
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/policies")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    rows = {}
    for name in args.policies.split(","):
        cfg = load_config(None, [*args.overrides, *POLICIES[name]])
        s = train(cfg, Path(args.out) / name, progress=False, overwrite=True)  # a rerun replaces
        loop = s["loop_time_s"]
        rows[name] = {
            "bubble_ratio": s["bubble_ratio"],
            "loop_time_s": loop,
            "rollout_time_s": s["rollout_time_s"],
            "update_time_s": s["update_time_s"],
            "goodput_tokens_per_s": s["tokens_trained"] / loop,
            "goodput_samples_per_s": s["samples_trained"] / loop,
            "wasted_token_share": s["wasted_token_share"],
            "max_staleness_trained": s["max_staleness_trained"],
            "samples_trained": s["samples_trained"],
            "eval_before": s["eval_before"]["accuracy"],
            "eval_after": s["eval_after"]["accuracy"],
        }
        print(name, json.dumps(rows[name]), flush=True)
    base = rows.get("sync")
    print(
        f"\n{'policy':12s} {'bubble':>7s} {'vs sync':>7s} {'loop s':>7s} {'tok/s':>7s} "
        f"{'vs sync':>7s} {'smp/s':>6s} {'wasted':>7s} {'stale':>5s} {'acc before->after':>18s}"
    )
    for name, r in rows.items():
        vb = (
            r["bubble_ratio"] / base["bubble_ratio"]
            if base and base["bubble_ratio"]
            else float("nan")
        )
        vg = (r["goodput_tokens_per_s"] / base["goodput_tokens_per_s"]) if base else float("nan")
        print(
            f"{name:12s} {r['bubble_ratio']:7.1%} {vb:7.2f} {r['loop_time_s']:7.1f} "
            f"{r['goodput_tokens_per_s']:7.0f} {vg:7.2f} {r['goodput_samples_per_s']:6.1f} "
            f"{r['wasted_token_share']:7.1%} {r['max_staleness_trained']:5d} "
            f"{r['eval_before']:8.3f} -> {r['eval_after']:.3f}"
        )
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "policies.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
