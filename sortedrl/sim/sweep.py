"""`sortedrl simulate --sweep`: the user's lengths and cluster, every rollout batch and
staleness bound of `sorted`, and the setting to use.

For each `max_staleness` in `STALENESS` it simulates `sorted` (cache=keep) with its own rollout
batch (`auto`, the window-fit rule) and with every fixed R = kU, k in `FIXED`, beside `sync`
(the baseline) and `partial` (unbounded staleness, R = 4U: the bound's cost). The recommended
setting is the bounded one with the best goodput; the table says what each costs in bubble and
discarded work against `sync`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from sortedrl.engines.costmodel import CostModel, get_preset
from sortedrl.errors import ConfigError
from sortedrl.scheduling.config import SchedulerConfig
from sortedrl.sim.layout import cluster_spec
from sortedrl.sim.simulate import SimSettings, check_settings, run_policy, scheduler_config
from sortedrl.workload import Workload

STALENESS = (1, 2)
FIXED = (2, 3, 4, 5, 6)
SWEPT = ("rollout_batch", "max_staleness", "cache")  # the sweep sets these itself
KEYS = (
    "bubble_ratio",
    "goodput_tokens_per_s",
    "wasted_token_share",
    "max_staleness_trained",
    "mean_staleness_trained",
    "wall_time_s",
)


def sweep_rows(update_batch: int) -> list[tuple[str, str, dict[str, Any]]]:
    """(label, policy, the settings the sweep sets) of every run, baseline first."""
    rows: list[tuple[str, str, dict[str, Any]]] = [
        ("sync", "sync", {}),
        ("partial R=4U", "partial", {"rollout_batch": 4 * update_batch}),
    ]
    for k in STALENESS:
        rows.append((f"sorted K={k} R=auto", "sorted", {"cache": "keep", "max_staleness": k}))
        rows += [
            (
                f"sorted K={k} R={f}U",
                "sorted",
                {"cache": "keep", "max_staleness": k, "rollout_batch": f * update_batch},
            )
            for f in FIXED
        ]
    return rows


def sweep(s: SimSettings, workload: Workload) -> dict[str, Any]:
    """Run every row of the sweep on `workload`; returns the JSON document with the rows, the
    recommended setting and the settings of the study."""
    given = sorted(k for k in SWEPT if k in s.scheduler)
    if given:
        raise ConfigError(
            f"--sweep sets {', '.join('--' + k.replace('_', '-') for k in given)} itself; remove it"
        )
    preset = get_preset(s.preset)
    CostModel(preset)
    spec = cluster_spec(s.cluster, preset)
    if s.prompts > len(workload):
        raise ConfigError(f"--prompts {s.prompts} exceeds the {len(workload)} prompts of the trace")
    u = int(s.scheduler.get("update_batch", SchedulerConfig.model_fields["update_batch"].default))
    rows: dict[str, dict[str, Any]] = {}
    plan = sweep_rows(u)
    # Every setting checked before any time is spent: each is read by one of the policies,
    # and every row's config is valid.
    check_settings(replace(s, policies=["sync", "sorted"]), spec)
    for _, policy, over in plan:
        scheduler_config(replace(s, scheduler={**s.scheduler, **over}), policy, spec.response_cap)
    for label, policy, over in plan:
        one = replace(s, policies=[policy], scheduler={**s.scheduler, **over})
        result = run_policy(one, policy, workload, spec)
        row = {k: result.summary[k] for k in KEYS}
        row["rollout_batch"] = result.controller.rollout_batch  # auto: where the rule ended
        row["max_staleness"] = over.get("max_staleness")
        rows[label] = row
    base = rows["sync"]
    for row in rows.values():
        row["goodput_vs_sync"] = row["goodput_tokens_per_s"] / base["goodput_tokens_per_s"]
        row["bubble_vs_sync"] = (
            row["bubble_ratio"] / base["bubble_ratio"] if base["bubble_ratio"] else None
        )
    bounded = [label for label in rows if label.startswith("sorted")]
    best = max(bounded, key=lambda label: rows[label]["goodput_tokens_per_s"])
    return {
        "settings": {
            "preset": s.preset,
            "prompts": s.prompts,
            "epochs": s.epochs,
            "seed": s.seed,
            "update_batch": u,
            "workload": workload.source,
            "gpus": spec.gpus,
            **s.scheduler,
        },
        "rows": rows,
        "recommended": best,
    }
