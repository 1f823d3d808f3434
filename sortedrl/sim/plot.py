"""Plots for `sortedrl simulate`: engine occupancy over time and bubble ratios side by side."""

from __future__ import annotations

import os
import tempfile
from typing import Any


def plot_simulation(doc: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    policies = doc["policies"]
    timelines = doc["_timelines"]
    n = len(policies)
    fig, axes = plt.subplots(n + 1, 1, figsize=(10, 2.2 * (n + 1)), constrained_layout=True)
    for ax, (name, summary) in zip(axes[:-1], policies.items(), strict=True):
        times, active = timelines[name]
        cap = summary["capacity"]
        ax.fill_between(times, active, step="post", alpha=0.6, label="running sequences")
        ax.axhline(cap, color="black", lw=0.8, ls="--", label=f"capacity {cap}")
        for t in summary["update_times_s"]:
            ax.axvline(t, color="tab:red", lw=0.4, alpha=0.6)
        ax.set_ylabel(name)
        ax.set_title(
            f"{name}: bubble {summary['bubble_ratio']:.1%}, wall {summary['wall_time_s']:.0f} s, "
            f"goodput {summary['goodput_tokens_per_s']:.0f} tok/s (red: updates)",
            fontsize=9,
        )
        ax.set_xlim(left=0)
    axes[-2].set_xlabel("time (s)")
    names = list(policies)
    bars = axes[-1].bar(names, [policies[p]["bubble_ratio"] for p in names], color="tab:gray")
    axes[-1].bar_label(bars, labels=[f"{policies[p]['bubble_ratio']:.1%}" for p in names])
    axes[-1].set_ylabel("bubble ratio")
    axes[-1].set_ylim(0, 1)
    _save_atomic(fig, path)
    plt.close(fig)


def _save_atomic(fig: Any, path: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
