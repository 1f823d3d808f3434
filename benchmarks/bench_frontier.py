"""The goodput-staleness frontier: every policy and setting on several workload families.

For each workload family (the preset's default, a bimodal mix, a heavy tail with responses at
the cap) and each setting below, one simulated run at the paper's setting (8 x H100, Llama 3.1
8B, update batch 128 prompts x 8, rollout batch 320 unless the setting says otherwise) over
several epochs of the same prompts (each epoch draws fresh lengths from every prompt's own
distribution, so a prompt's history predicts its lengths without fixing them). Prints bubble
ratio, goodput (trained tokens per second) against `sync` and `partial` of the same family,
the share of generated tokens discarded, and max / mean staleness of trained tokens; writes
the JSON and a plot of goodput against mean staleness.

Every setting runs at several workload seeds (`--seeds`, default 0,1,2): a run at the paper's
scale is a chain of a few dozen updates, and one seed can land in another regime than the next
(at `max_staleness` 1 the goodput of one setting moves by 20% between seeds). The tables give
the mean over seeds and, for goodput against sync, the lowest and highest seed.

Run: python benchmarks/bench_frontier.py [--prompts 1024] [--epochs 2] [--seeds 0,1,2]
     [--families a,b] [--json runs/frontier.json] [--plot runs/frontier.png]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from sortedrl.engines.costmodel import get_preset
from sortedrl.sim.simulate import SimSettings, build_workload, run_policy

PRESET = "llama3.1-8b-h100"
FAMILIES = {
    "default": None,  # the preset's long-tailed default (median ~2k, a tail to the 16k cap)
    "bimodal": "0.8*lognormal:median=1000,sigma=0.3,prompt_sigma=0.2"
    "+0.2*lognormal:median=6000,sigma=0.3,prompt_sigma=0.2",
    "heavy-tail": "lognormal:median=1500,sigma=1.0,prompt_sigma=0.5",
}
UNPACED = {"update_pacing": False}  # update pacing is on by default for sorted
LONGEST = {"submit_order": "longest_predicted"}
K1 = {"max_staleness": 1}
# (label, policy, settings): each overrides SimSettings.scheduler (SchedulerConfig fields).
# With cache=drop every complete group is at the limit and pacing never waits, so the drop
# rows are the same with it on (the default) or off.
SETTINGS: list[tuple[str, str, dict[str, Any]]] = [
    ("sync", "sync", {}),
    ("partial", "partial", {}),
    ("sorted drop R=320", "sorted", {"cache": "drop"}),
    ("sorted drop R=192", "sorted", {"cache": "drop", "rollout_batch": 192}),
    ("sorted keep K=2 unpaced", "sorted", {"cache": "keep", **UNPACED}),
    ("sorted keep K=2 unpaced longest", "sorted", {"cache": "keep", **UNPACED, **LONGEST}),
    ("sorted keep K=2 unpaced round", "sorted", {"cache": "keep", "admission": "round", **UNPACED}),
    ("sorted keep K=2 paced", "sorted", {"cache": "keep"}),
    ("sorted keep K=2 paced+longest", "sorted", {"cache": "keep", **LONGEST}),
    ("sorted keep K=2 paced R=288", "sorted", {"cache": "keep", "rollout_batch": 288}),
    ("sorted keep K=2 paced R=256", "sorted", {"cache": "keep", "rollout_batch": 256}),
    ("sorted keep K=1 unpaced", "sorted", {"cache": "keep", **K1, **UNPACED}),
    (
        "sorted keep K=1 unpaced R=192",
        "sorted",
        {"cache": "keep", **K1, **UNPACED, "rollout_batch": 192},
    ),
    ("sorted keep K=1 paced", "sorted", {"cache": "keep", **K1}),
    ("sorted keep K=1 paced R=224", "sorted", {"cache": "keep", **K1, "rollout_batch": 224}),
    ("sorted keep K=1 paced R=192", "sorted", {"cache": "keep", **K1, "rollout_batch": 192}),
]


def run_family(lengths: str | None, prompts: int, epochs: int, seed: int) -> dict[str, dict]:
    spec = get_preset(PRESET)
    workload = build_workload(
        trace=None, lengths=lengths, prompts=prompts, group_size=8, spec=spec, seed=seed
    )
    rows: dict[str, dict] = {}
    for label, policy, over in SETTINGS:
        # for_policy (in scheduler_config) leaves out what this policy does not read.
        base = {"group_size": 8, "update_batch": 128, "rollout_batch": 320, "max_staleness": 2}
        s = SimSettings(
            preset=PRESET,
            policies=[policy],
            prompts=prompts,
            scheduler={**base, "cache": "keep", **over},
            epochs=epochs,
            seed=seed,
        )
        r = run_policy(s, policy, workload, spec).summary
        rows[label] = {
            k: r[k]
            for k in (
                "bubble_ratio",
                "goodput_tokens_per_s",
                "wasted_token_share",
                "max_staleness_trained",
                "mean_staleness_trained",
                "wall_time_s",
                "prompts_trained",
            )
        }
    sync, partial = rows["sync"], rows["partial"]
    for row in rows.values():
        row["bubble_vs_sync"] = row["bubble_ratio"] / sync["bubble_ratio"]
        row["goodput_vs_sync"] = row["goodput_tokens_per_s"] / sync["goodput_tokens_per_s"]
        row["goodput_vs_partial"] = row["goodput_tokens_per_s"] / partial["goodput_tokens_per_s"]
    return rows


def over_seeds(per_seed: list[dict[str, dict]]) -> dict[str, dict]:
    """The mean of every figure over seeds; the worst max staleness; goodput against sync
    also as its lowest and highest seed."""
    out: dict[str, dict] = {}
    for label in per_seed[0]:
        rows = [rows[label] for rows in per_seed]
        mean = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
        mean["max_staleness_trained"] = max(r["max_staleness_trained"] for r in rows)
        mean["goodput_vs_sync_min"] = min(r["goodput_vs_sync"] for r in rows)
        mean["goodput_vs_sync_max"] = max(r["goodput_vs_sync"] for r in rows)
        out[label] = mean
    return out


def print_family(name: str, rows: dict[str, dict]) -> None:
    print(f"\n## {name}")
    print(
        f"{'setting':34s} {'bubble':>7s} {'vs sync':>7s} {'goodput':>8s} {'vs sync':>7s} "
        f"{'seeds':>11s} {'vs part':>7s} {'waste':>6s} {'stale max/mean':>14s}"
    )
    for label, r in rows.items():
        spread = f"{r['goodput_vs_sync_min']:.2f}-{r['goodput_vs_sync_max']:.2f}"
        print(
            f"{label:34s} {r['bubble_ratio']:7.1%} {r['bubble_vs_sync']:7.2f} "
            f"{r['goodput_tokens_per_s']:8.0f} {r['goodput_vs_sync']:7.2f} {spread:>11s} "
            f"{r['goodput_vs_partial']:7.2f} {r['wasted_token_share']:6.1%} "
            f"{r['max_staleness_trained']:>6d} / {r['mean_staleness_trained']:.2f}"
        )


def plot(results: dict[str, dict[str, dict]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4.6), squeeze=False)
    for ax, (family, rows) in zip(axes[0], results.items(), strict=True):
        for label, r in rows.items():
            x, y = r["mean_staleness_trained"], r["goodput_vs_sync"]
            ax.scatter([x], [y], s=28)
            ax.annotate(label, (x, y), fontsize=6, xytext=(3, 2), textcoords="offset points")
        ax.axhline(1.0, color="grey", lw=0.6)
        ax.set_title(family)
        ax.set_xlabel("mean staleness of trained tokens (versions)")
        ax.set_ylabel("goodput vs sync")
    fig.suptitle("goodput against staleness, simulated 8 x H100, Llama 3.1 8B (mean over seeds)")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=1024)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--seeds", default="0,1,2", help="workload seeds, comma-separated")
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--json", default="runs/frontier.json")
    ap.add_argument("--plot", default="runs/frontier.png")
    args = ap.parse_args()
    seeds = [int(x) for x in args.seeds.split(",")]
    results: dict[str, dict[str, dict]] = {}
    per_seed: dict[str, list[dict[str, dict]]] = {}
    t0 = time.perf_counter()
    for name in args.families.split(","):
        if name not in FAMILIES:
            ap.error(f"unknown family {name!r}; known: {', '.join(FAMILIES)}")
        per_seed[name] = [run_family(FAMILIES[name], args.prompts, args.epochs, s) for s in seeds]
        results[name] = over_seeds(per_seed[name])
        print_family(name, results[name])
    print(f"\n{time.perf_counter() - t0:.0f} s")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    doc = {"settings": vars(args), "results": results, "per_seed": per_seed}
    Path(args.json).write_text(json.dumps(doc, indent=1))
    plot(results, args.plot)
    print(f"wrote {args.json}, {args.plot}")


if __name__ == "__main__":
    main()
