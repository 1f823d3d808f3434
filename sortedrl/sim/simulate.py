"""`sortedrl simulate`: run scheduling policies side by side on the simulated engine.

Every policy sees the same prompts with the same recorded response lengths, the same update
batch and the same cost model, so differences in bubble, goodput and waste come from the
scheduling alone.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from sortedrl.engines.costmodel import ClusterSpec, CostModel, get_preset
from sortedrl.engines.simulated import SimulatedEngine
from sortedrl.engines.simulated_trainer import CostModelTrainer
from sortedrl.errors import ConfigError, format_validation_error
from sortedrl.scheduling.config import POLICIES, SchedulerConfig, ignored_settings
from sortedrl.scheduling.controller import Controller
from sortedrl.scheduling.loop import RewardHook, RunResult, run
from sortedrl.scheduling.protocol import Generation
from sortedrl.scheduling.state import PromptSpec
from sortedrl.sim.layout import LayoutSettings, Split, cluster_spec, splits
from sortedrl.workload import Workload, default_lengths_spec

# `sorted-drop` / `sorted-keep` let one run compare both cache policies.
VARIANTS = {"sorted-drop": ("sorted", "drop"), "sorted-keep": ("sorted", "keep")}
# 2048 prompts: 16 updates of 128 groups at the paper's setting, a few minutes on one core.
DEFAULT_PROMPTS = 2048


@dataclass
class SimSettings:
    """One side-by-side study. `scheduler` holds the `SchedulerConfig` settings given
    explicitly; each policy gets those it reads and the defaults for the rest."""

    preset: str
    policies: list[str]
    prompts: int
    scheduler: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    # GPUs and the rollout / training split (`sortedrl.sim.layout`); empty: the preset's
    cluster: LayoutSettings = field(default_factory=LayoutSettings)
    solve_rate: float | None = None  # None: no rewards (all 0); see `solve_rate_scorer`
    epochs: int = 1  # passes over the prompts; each pass draws fresh lengths per prompt


def build_workload(
    *,
    trace: str | None,
    lengths: str | None,
    prompts: int,
    group_size: int | None,
    spec: ClusterSpec,
    seed: int,
) -> Workload:
    """The response lengths every policy sees: from a trace, a spec, or the default spec for
    the preset's response cap."""
    if prompts < 1:
        raise ConfigError(f"--prompts must be >= 1, got {prompts}")
    if group_size is not None and group_size < 1:
        raise ConfigError(f"--group-size must be >= 1, got {group_size}")
    if trace and lengths:
        raise ConfigError("give --trace or --lengths, not both")
    if trace:
        workload = Workload.from_trace(trace, spec.response_cap, seed)
        if group_size is not None and group_size != workload.group_size:
            raise ConfigError(
                f"--group-size {group_size} does not match the trace {trace}, whose groups "
                f"have {workload.group_size} responses"
            )
        return workload
    ids = [f"p{i}" for i in range(prompts)]
    g = group_size or SchedulerConfig.model_fields["group_size"].default
    return Workload.from_spec(
        lengths or default_lengths_spec(spec.response_cap), spec.response_cap, g, ids, seed
    )


def parse_policies(text: str) -> list[str]:
    names = [p.strip() for p in text.split(",") if p.strip()]
    if not names:
        raise ConfigError("--policies: give at least one of " + ", ".join(POLICIES))
    known = set(POLICIES) | set(VARIANTS)
    for name in names:
        if name not in known:
            raise ConfigError(
                f"--policies: unknown policy '{name}'; known: {', '.join(sorted(known))}"
            )
    if len(set(names)) != len(names):
        raise ConfigError("--policies: a policy is named twice")
    return names


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _why_unread(s: SimSettings, name: str, key: str) -> str | None:
    """Why policy `name` does not read setting `key`; None when it does."""
    if name in VARIANTS and key == "cache":
        return f"{name} sets the cache itself"
    default_cache = SchedulerConfig.model_fields["cache"].default
    policy, cache = VARIANTS.get(name, (name, s.scheduler.get("cache", default_cache)))
    return ignored_settings(policy, cache).get(key)


def check_settings(s: SimSettings, spec: ClusterSpec) -> None:
    """Every explicit setting is read by at least one policy of the study, and valid."""
    for key in s.scheduler:
        reasons = [_why_unread(s, name, key) for name in s.policies]
        if all(reasons):
            raise ConfigError(
                f"{_flag(key)} is set, but no policy in --policies reads it "
                f"({'; '.join(dict.fromkeys(r for r in reasons if r))})"
            )
    if s.solve_rate is not None and not 0.0 <= s.solve_rate <= 1.0:
        raise ConfigError(f"--solve-rate must be in [0, 1], got {s.solve_rate}")
    if s.scheduler.get("filter_equal_rewards") and s.solve_rate is None:
        raise ConfigError(
            "--filter-equal-rewards needs --solve-rate: without it every simulated reward is 0 "
            "and every group would be filtered"
        )
    cap = s.scheduler.get("max_new_tokens")
    if cap is not None and cap > spec.response_cap:
        raise ConfigError(
            f"--max-new-tokens {cap} exceeds the response cap {spec.response_cap} that preset "
            f"'{spec.name}' is sized for"
        )
    for name in s.policies:
        scheduler_config(s, name, spec.response_cap)
        splits(s.cluster, spec, name)


def scheduler_config(s: SimSettings, name: str, cap: int) -> SchedulerConfig:
    """Policy `name`'s config: the settings it reads; the response cap is the preset's
    unless --max-new-tokens says otherwise."""
    policy, cache = VARIANTS.get(name, (name, None))
    settings = {"max_new_tokens": cap, **s.scheduler}
    if cache is not None:
        settings["cache"] = cache
    try:
        return SchedulerConfig.for_policy(policy, **settings)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e)) from None


def _prompt_specs(
    workload: Workload, spec: ClusterSpec, n: int, epochs: int = 1
) -> list[PromptSpec]:
    ids = workload.prompt_ids()[:n]
    return [PromptSpec(pid, spec.prompt_len, epoch=e) for e in range(epochs) for pid in ids]


def run_policy(
    s: SimSettings,
    name: str,
    workload: Workload,
    spec: ClusterSpec,
    progress: Callable[[int], None] | None = None,
    split: Split | None = None,
) -> RunResult:
    """One policy on `split` (`sortedrl.sim.layout`); None: every GPU of `spec` rolls out
    and trains, the engine paused for updates."""
    cfg = scheduler_config(s, name, spec.response_cap)
    engine_gpus = spec.gpus if split is None else split.rollout_gpus
    train_gpus = spec.gpus if split is None else split.trainer_ranks
    engine = SimulatedEngine(spec, workload, gpus=engine_gpus)
    trainer = CostModelTrainer(spec, gpus=train_gpus)
    controller = Controller(cfg, _prompt_specs(workload, spec, s.prompts, s.epochs))

    def on_update(record, batch, result) -> None:
        if progress is not None:
            progress(record.samples // cfg.group_size)

    scorer = None if s.solve_rate is None else solve_rate_scorer(s.seed, s.solve_rate)
    # Separate devices: the engine keeps its KV cache across an update (nothing to free).
    pause = split is None or split.layout == "colocated"
    return run(
        controller, engine, trainer, scorer=scorer, on_update=on_update, pause_for_update=pause
    )


def solve_rate_scorer(seed: int, rate: float) -> RewardHook:
    """Simulated rewards: a response is correct (1.0) with probability `rate`, drawn from a
    hash of (seed, prompt, sample, length), so every policy sees the same rewards for the
    same responses and a regenerated response of another length draws again."""

    def score(
        gens: Sequence[Generation], keys: Sequence[tuple[str, int]]
    ) -> tuple[list[float], float]:
        out = []
        for gen, (pid, index) in zip(gens, keys, strict=True):
            key = f"{seed}\x00{pid}\x00{index}\x00{gen.n_tokens}".encode()
            u = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") * 2.0**-64
            out.append(1.0 if u < rate else 0.0)
        return out, 0.0

    return score


def simulate(
    s: SimSettings,
    workload: Workload,
    progress: Callable[[str, int], None] | None = None,
) -> dict[str, Any]:
    """Run every policy; returns the JSON document (`{"policies": {...}, "settings": ...}`)."""
    preset = get_preset(s.preset)
    CostModel(preset)  # validate the preset fits before spending time
    spec = cluster_spec(s.cluster, preset)
    if s.epochs < 1:
        raise ConfigError(f"--epochs must be >= 1, got {s.epochs}")
    if s.prompts > len(workload):
        raise ConfigError(f"--prompts {s.prompts} exceeds the {len(workload)} prompts of the trace")
    check_settings(s, spec)  # every setting checked before any time is spent
    results: dict[str, Any] = {}
    timelines: dict[str, Any] = {}
    for name in s.policies:
        report = (lambda n, name=name: progress(name, n)) if progress else None
        result, split = _best_split(s, name, workload, spec, report)
        summary = dict(result.summary)
        summary["update_times_s"] = [round(u.time_s, 3) for u in result.controller.ledger.updates]
        summary.update(split.as_dict())
        summary["gpu_busy_share"] = _gpu_busy_share(summary, split)
        summary["capacity"] = result.clock.capacity
        # The R the run ended with: the setting, or where sorted's window-fit rule settled.
        summary["rollout_batch"] = result.controller.rollout_batch
        summary["replica_bubble_ratio"] = _replica_bubbles(result, spec)
        results[name] = summary
        timelines[name] = result.clock.timeline.series()
    base = results.get("sync")
    if base:
        for summary in results.values():
            summary["vs_sync"] = {
                "bubble_ratio": _ratio(summary["bubble_ratio"], base["bubble_ratio"]),
                "wall_time": _ratio(summary["wall_time_s"], base["wall_time_s"]),
                "goodput": _ratio(summary["goodput_tokens_per_s"], base["goodput_tokens_per_s"]),
            }
    defaults = {k: f.default for k, f in SchedulerConfig.model_fields.items() if k != "policy"}
    settings = {
        "preset": s.preset,
        "policies": s.policies,
        "prompts": s.prompts,
        "epochs": s.epochs,
        **defaults,
        "max_new_tokens": spec.response_cap,
        **s.scheduler,
        "seed": s.seed,
        "cluster": s.cluster.given(),
        "gpus": spec.gpus,
        "tensor_parallel_size": spec.tp,
        "solve_rate": s.solve_rate,
        "preset_description": CostModel(spec).describe(),
    }
    return {
        "settings": settings,
        "policies": results,
        "_timelines": timelines,
    }


def _best_split(
    s: SimSettings,
    name: str,
    workload: Workload,
    spec: ClusterSpec,
    report: Callable[[int], None] | None,
) -> tuple[RunResult, Split]:
    """Policy `name` on its layout; with several candidate splits, the best goodput."""
    candidates = splits(s.cluster, spec, name)
    best: tuple[RunResult, Split] | None = None
    for split in candidates:
        one = report if len(candidates) == 1 else None
        result = run_policy(s, name, workload, spec, one, split)
        goodput = result.summary["goodput_tokens_per_s"]
        if best is None or goodput > best[0].summary["goodput_tokens_per_s"]:
            best = (result, split)
    assert best is not None
    if report is not None and len(candidates) > 1:
        report(best[0].summary["prompts_trained"])
    return best


def _replica_bubbles(result: RunResult, spec: ClusterSpec) -> list[float]:
    """Each replica's bubble ratio over the engine's generating time."""
    engine = result.engine
    assert isinstance(engine, SimulatedEngine)
    slots = spec.max_num_seqs * result.clock.generating_s
    return [
        round(1.0 - b / slots, 4) if slots else 0.0
        for b in (r.busy_slot_s for r in engine.replicas)
    ]


def _gpu_busy_share(summary: dict[str, Any], split: Split) -> float:
    """Share of the study's GPU-seconds spent generating or training (idle: the rest, e.g.
    the rollout GPUs of a separate layout while a sync update runs)."""
    wall = summary["wall_time_s"]
    if wall <= 0:
        return 0.0
    busy = (
        summary["rollout_time_s"] * split.rollout_gpus
        + summary["update_time_s"] * split.trainer_ranks
    )
    if split.layout == "colocated":
        busy = (summary["rollout_time_s"] + summary["update_time_s"]) * split.gpus
    return busy / (split.gpus * wall)


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None
