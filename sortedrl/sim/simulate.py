"""`sortedrl simulate`: run scheduling policies side by side on the simulated engine.

Every policy sees the same prompts with the same recorded response lengths, the same update
batch and the same cost model, so differences in bubble, goodput and waste come from the
scheduling alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from sortedrl.engines.costmodel import ClusterSpec, CostModel, get_preset
from sortedrl.engines.simulated import CostModelTrainer, SimulatedEngine
from sortedrl.errors import ConfigError, format_validation_error
from sortedrl.scheduling.config import POLICIES, SchedulerConfig
from sortedrl.scheduling.controller import Controller
from sortedrl.scheduling.loop import RunResult, run
from sortedrl.scheduling.state import PromptSpec
from sortedrl.sim.workload import Workload

# `sorted-drop` / `sorted-keep` let one run compare both cache policies.
VARIANTS = {"sorted-drop": ("sorted", "drop"), "sorted-keep": ("sorted", "keep")}


@dataclass
class SimSettings:
    preset: str
    policies: list[str]
    prompts: int
    group_size: int
    rollout_batch: int
    update_batch: int
    cache: str = "keep"
    max_staleness: int = 1
    max_regenerations: int = 2
    admission: str = "auto"
    seed: int = 0
    async_rollout_gpus: int | None = None  # None: try the splits and keep the best goodput
    epochs: int = 1  # passes over the prompts; each pass draws fresh lengths per prompt
    submit_order: str = "fifo"
    update_pacing: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def build_workload(
    *,
    trace: str | None,
    lengths: str | None,
    prompts: int,
    group_size: int | None,
    spec: ClusterSpec,
    seed: int,
) -> Workload:
    """The response lengths every policy sees: from a trace, a spec, or the preset's default."""
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
    return Workload.from_spec(
        lengths or spec.default_lengths, spec.response_cap, group_size or 8, ids, seed
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


def scheduler_config(s: SimSettings, name: str, cap: int) -> SchedulerConfig:
    policy, cache = VARIANTS.get(name, (name, s.cache))
    try:
        return SchedulerConfig(
            policy=policy,
            cache=cache,
            group_size=s.group_size,
            rollout_batch=s.rollout_batch,
            update_batch=s.update_batch,
            max_staleness=s.max_staleness,
            max_regenerations=s.max_regenerations,
            admission=s.admission,
            max_new_tokens=cap,
            submit_order=s.submit_order,
            update_pacing=s.update_pacing and policy == "sorted",
        )
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
    rollout_gpus: int | None = None,
) -> RunResult:
    cfg = scheduler_config(s, name, spec.response_cap)
    engine_gpus = rollout_gpus if rollout_gpus is not None else spec.gpus
    train_gpus = spec.gpus - rollout_gpus if rollout_gpus is not None else spec.gpus
    engine = SimulatedEngine(spec, workload, gpus=engine_gpus)
    trainer = CostModelTrainer(spec, gpus=train_gpus)
    controller = Controller(cfg, _prompt_specs(workload, spec, s.prompts, s.epochs))

    def on_update(record, batch, result) -> None:
        if progress is not None:
            progress(record.samples // cfg.group_size)

    return run(controller, engine, trainer, on_update=on_update)


def async_splits(spec: ClusterSpec) -> list[int]:
    """Candidate GPU counts for rollout in an async run: whole replicas, leaving >= 1 GPU to
    train."""
    return [g for g in range(spec.tp, spec.gpus, spec.tp)]


def simulate(
    s: SimSettings,
    workload: Workload,
    progress: Callable[[str, int], None] | None = None,
) -> dict[str, Any]:
    """Run every policy; returns the JSON document (`{"policies": {...}, "settings": ...}`)."""
    spec = get_preset(s.preset)
    CostModel(spec)  # validate the preset fits before spending time
    if s.epochs < 1:
        raise ConfigError(f"--epochs must be >= 1, got {s.epochs}")
    if s.prompts > len(workload):
        raise ConfigError(f"--prompts {s.prompts} exceeds the {len(workload)} prompts of the trace")
    for name in s.policies:  # every setting checked before any time is spent
        scheduler_config(s, name, spec.response_cap)
    results: dict[str, Any] = {}
    timelines: dict[str, Any] = {}
    for name in s.policies:
        report = (lambda n, name=name: progress(name, n)) if progress else None
        if name == "async":
            result, split = _best_async(s, workload, spec, report)
        else:
            result, split = run_policy(s, name, workload, spec, report), None
        summary = dict(result.summary)
        summary["update_times_s"] = [round(u.time_s, 3) for u in result.controller.ledger.updates]
        if split is not None:
            summary["rollout_gpus"], summary["train_gpus"] = split
        summary["capacity"] = result.clock.capacity
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
    return {
        "settings": {**s.__dict__, "preset_description": CostModel(spec).describe()},
        "policies": results,
        "_timelines": timelines,
    }


def _best_async(s, workload, spec, report):
    splits = [s.async_rollout_gpus] if s.async_rollout_gpus else async_splits(spec)
    if not splits:
        raise ConfigError(
            f"async needs separate rollout and training GPUs; preset '{spec.name}' has "
            f"{spec.gpus} GPUs with tensor-parallel size {spec.tp}"
        )
    best = None
    for g in splits:
        if g % spec.tp or not 0 < g < spec.gpus:
            raise ConfigError(
                f"--async-rollout-gpus {g}: must be a multiple of tp={spec.tp} below {spec.gpus}"
            )
        result = run_policy(s, "async", workload, spec, report if len(splits) == 1 else None, g)
        if (
            best is None
            or result.summary["goodput_tokens_per_s"] > best[0].summary["goodput_tokens_per_s"]
        ):
            best = (result, (g, spec.gpus - g))
    assert best is not None
    if report is not None and len(splits) > 1:
        report(best[0].summary["prompts_trained"])
    return best


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None
