"""The `sortedrl` command line."""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from sortedrl.errors import SortedRLError

console = Console(stderr=True)
out = Console()


def friendly_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """User mistakes become one clear line and exit code 2, never a traceback."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SortedRLError as e:
            console.print(f"[bold red]error:[/] {e}", highlight=False)
            sys.exit(2)

    return wrapper


@click.group()
@click.version_option(package_name="sortedrl")
def main() -> None:
    """sortedrl: RL for language models with length-aware rollout scheduling (SortedRL)."""


class _IntOrAuto(click.ParamType):
    name = "integer|auto"

    def convert(self, value: Any, param: Any, ctx: Any) -> int | str:
        if isinstance(value, int) or value == "auto":
            return value
        try:
            return int(value)
        except ValueError:
            self.fail(f"{value!r} is neither an integer nor auto", param, ctx)


_INT_OR_AUTO = _IntOrAuto()


def _scheduler_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """One click option per `SchedulerConfig` field (policy aside: --policies), with the
    field's description and default; unset options stay None, so the study knows what was
    given explicitly."""
    from sortedrl.scheduling.config import SchedulerConfig

    special = {
        "group_size": "the trace's group size, or {default}",
        "max_new_tokens": "the preset's response cap",
    }
    for name, f in reversed(SchedulerConfig.model_fields.items()):
        if name == "policy":
            continue
        default = special.get(name, "{default}").format(default=f.default)
        help_text = f"{f.description} [default: {default}]"
        flag = "--" + name.replace("_", "-")
        if f.annotation is bool:
            fn = click.option(f"{flag}/--no-{flag[2:]}", default=None, help=help_text)(fn)
        elif name == "rollout_batch":  # a number, or auto (sorted's window-fit rule)
            fn = click.option(flag, type=_INT_OR_AUTO, default=None, help=help_text)(fn)
        elif get_origin(f.annotation) is Literal:
            choice = click.Choice(list(get_args(f.annotation)))
            fn = click.option(flag, type=choice, default=None, help=help_text)(fn)
        else:
            fn = click.option(flag, type=f.annotation, default=None, help=help_text)(fn)
    return fn


def _cluster_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`--gpus` and one option per `ClusterConfig` field a simulated run reads, under the
    field's name, with its description and what it defaults to in a simulation."""
    from sortedrl.sim.layout import CLUSTER_FIELDS, description, flag

    simulated = {
        "rollout_replicas": "Simulated: tp GPUs each [default: colocated: GPUs / tp; "
        "separate: the GPUs left beside --trainer-ranks, or with neither every whole-replica "
        "split, the best goodput reported]",
        "trainer_ranks": "Simulated: one GPU each [default: colocated: every GPU, and nothing "
        "else is allowed; separate: the GPUs left beside the replicas]",
        "tensor_parallel_size": "Simulated: any model [default: the preset's tp]",
        "layout": "Simulated: separate sync/sorted/partial runs take turns on their own "
        "devices, without pausing the engine (sortedrl.sim.layout)",
    }
    for name in reversed(CLUSTER_FIELDS):
        help_text = f"cluster.{name} of `sortedrl train` ({description(name)}). {simulated[name]}"
        kind = click.Choice(["colocated", "separate"]) if name == "layout" else int
        fn = click.option(flag(name), type=kind, default=None, help=help_text)(fn)
    return click.option(
        "--gpus",
        type=int,
        default=None,
        help="GPUs of the simulated cluster, for every policy of the study [default: the preset's]",
    )(fn)


def _preset_help() -> str:
    from sortedrl.engines.costmodel import PRESETS

    lines = "; ".join(p.headline() for p in PRESETS.values() if p.name != "test-tiny")
    return f"cost-model preset: {lines}"


@main.command()
@click.option("--preset", default="llama3.1-8b-h100", show_default=True, help=_preset_help())
@click.option(
    "--policies",
    default="sync,sorted-drop,sorted-keep,partial,async",
    show_default=True,
    help="comma-separated: sync, sorted, partial, async (sorted-drop / sorted-keep pick the cache)",
)
@click.option("--trace", type=click.Path(), help="JSONL trace of recorded response lengths")
@click.option("--lengths", help="length spec, e.g. 'lognormal:median=1500,sigma=1.0'")
@click.option(
    "--prompts",
    type=int,
    default=None,
    help="prompts to simulate [default: all of --trace, else 2048]",
)
@_scheduler_options
@_cluster_options
@click.option(
    "--solve-rate",
    type=float,
    default=None,
    help="simulated rewards: each response is correct with this probability (what "
    "--filter-equal-rewards needs) [default: no rewards, all 0]",
)
@click.option(
    "--epochs",
    type=int,
    default=1,
    show_default=True,
    help="passes over the prompts; each draws fresh lengths from the prompt's distribution",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--sweep",
    is_flag=True,
    help="instead of --policies: sweep sorted's rollout batch (auto and 2U..6U) and "
    "max_staleness (1, 2) against sync and partial on these lengths and this cluster, and "
    "recommend the setting with the best goodput",
)
@click.option("--json", "json_path", type=click.Path(), help="write the results here")
@click.option("--plot", "plot_path", type=click.Path(), help="write a PNG here")
@friendly_errors
def simulate(**kw: Any) -> None:
    """Compare scheduling policies on the simulated engine at paper scale, in virtual time.
    The scheduler options are `sortedrl train`'s `scheduler` section; docs/simulate.md spells out
    the paper's setting."""
    from sortedrl.engines.costmodel import get_preset
    from sortedrl.errors import ConfigError
    from sortedrl.io import write_json_atomic
    from sortedrl.scheduling.config import SchedulerConfig
    from sortedrl.sim.layout import CLUSTER_FIELDS, LayoutSettings
    from sortedrl.sim.simulate import (
        DEFAULT_PROMPTS,
        SimSettings,
        build_workload,
        parse_policies,
        simulate,
    )

    spec = get_preset(kw["preset"])
    if kw["sweep"]:
        given = click.get_current_context().get_parameter_source("policies")
        if given is not click.core.ParameterSource.DEFAULT:
            raise ConfigError("--sweep picks the policies itself; remove --policies")
        if kw["plot_path"]:
            raise ConfigError("--sweep writes no plot; remove --plot (--json keeps the table)")
    policies = parse_policies(kw["policies"])
    scheduler = {
        k: kw[k] for k in SchedulerConfig.model_fields if k != "policy" and kw[k] is not None
    }
    workload = build_workload(
        trace=kw["trace"],
        lengths=kw["lengths"],
        prompts=kw["prompts"] or DEFAULT_PROMPTS,
        group_size=scheduler.get("group_size"),
        spec=spec,
        seed=kw["seed"],
    )
    prompts = kw["prompts"]
    if prompts is None:
        prompts = len(workload) if kw["trace"] else DEFAULT_PROMPTS
        if kw["trace"]:
            console.print(f"note: --trace {kw['trace']}: simulating all its {prompts} prompts")
    scheduler["group_size"] = workload.group_size
    settings = SimSettings(
        preset=kw["preset"],
        policies=policies,
        prompts=prompts,
        scheduler=scheduler,
        seed=kw["seed"],
        cluster=LayoutSettings(**{k: kw[k] for k in ("gpus", *CLUSTER_FIELDS)}),
        solve_rate=kw["solve_rate"],
        epochs=kw["epochs"],
    )
    if kw["sweep"]:
        from sortedrl.sim.sweep import sweep

        with console.status("sweeping rollout batch and staleness"):
            doc = sweep(settings, workload)
        _print_sweep(doc)
        if kw["json_path"]:
            write_json_atomic(kw["json_path"], doc)
            console.print(f"wrote {kw['json_path']}")
        return
    with Progress(
        TextColumn("{task.description:>12}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("prompts trained"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as bar:
        tasks = {p: bar.add_task(p, total=prompts * kw["epochs"]) for p in policies}
        doc = simulate(settings, workload, lambda name, n: bar.advance(tasks[name], n))
    timelines = doc.pop("_timelines")
    _print_sim_table(doc)
    if kw["json_path"]:
        write_json_atomic(kw["json_path"], doc)
        console.print(f"wrote {kw['json_path']}")
    if kw["plot_path"]:
        from sortedrl.sim.plot import plot_simulation

        plot_simulation({**doc, "_timelines": timelines}, kw["plot_path"])
        console.print(f"wrote {kw['plot_path']}")


def _print_sweep(doc: dict[str, Any]) -> None:
    s = doc["settings"]
    table = Table(
        title=f"{s['preset']}: {s['prompts']} prompts x {s['epochs']} epoch(s), "
        f"U={s['update_batch']}, {s['workload']}"
    )
    for name in (
        "setting",
        "R",
        "goodput (tok/s)",
        "vs sync",
        "bubble",
        "vs sync bubble",
        "wasted",
        "max stale",
        "mean stale",
    ):
        table.add_column(name, justify="right")
    for label, r in doc["rows"].items():
        mark = " *" if label == doc["recommended"] else ""
        bubble_vs = r["bubble_vs_sync"]
        table.add_row(
            label + mark,
            str(r["rollout_batch"]),
            f"{r['goodput_tokens_per_s']:.0f}",
            f"{r['goodput_vs_sync']:.2f}",
            f"{r['bubble_ratio']:.1%}",
            "-" if bubble_vs is None else f"{bubble_vs:.2f}",
            f"{r['wasted_token_share']:.1%}",
            str(r["max_staleness_trained"]),
            f"{r['mean_staleness_trained']:.2f}",
        )
    out.print(table)
    best = doc["rows"][doc["recommended"]]
    out.print(
        f"recommended: {doc['recommended']} (scheduler.max_staleness={best['max_staleness']}, "
        f"scheduler.rollout_batch="
        f"{'auto' if 'auto' in doc['recommended'] else best['rollout_batch']}): predicted "
        f"goodput x{best['goodput_vs_sync']:.2f} of sync, bubble {best['bubble_ratio']:.1%} "
        f"(sync {doc['rows']['sync']['bubble_ratio']:.1%}), {best['wasted_token_share']:.1%} "
        "of generated tokens discarded",
        highlight=False,
    )


def _layout_cell(p: dict[str, Any]) -> str:
    """`colocated 4x4` (replicas x tp, training on the same GPUs) or `separate 2x4+8`."""
    cell = f"{p['layout']} {p['rollout_replicas']}x{p['tensor_parallel_size']}"
    return cell if p["layout"] == "colocated" else f"{cell}+{p['trainer_ranks']}"


def _print_sim_table(doc: dict[str, Any]) -> None:
    s = doc["settings"]
    table = Table(
        title=f"{s['preset']}: {s['prompts']} prompts x G={s['group_size']}, "
        f"R={s['rollout_batch']}, U={s['update_batch']}, max_staleness={s['max_staleness']}"
    )
    cols = [
        ("policy", None),
        ("layout", None),
        ("bubble", "bubble_ratio"),
        ("wall (s)", "wall_time_s"),
        ("rollout (s)", "rollout_time_s"),
        ("update (s)", "update_time_s"),
        ("goodput (tok/s)", "goodput_tokens_per_s"),
        ("wasted", "wasted_token_share"),
        ("max stale", "max_staleness_trained"),
        ("mean stale", "mean_staleness_trained"),
        ("updates", "updates"),
        ("vs sync: bubble / wall / goodput", None),
    ]
    for name, _ in cols:
        table.add_column(name, justify="right")
    for name, p in doc["policies"].items():
        vs = p.get("vs_sync")
        table.add_row(
            name,
            _layout_cell(p),
            f"{p['bubble_ratio']:.1%}",
            f"{p['wall_time_s']:.0f}",
            f"{p['rollout_time_s']:.0f}",
            f"{p['update_time_s']:.0f}",
            f"{p['goodput_tokens_per_s']:.0f}",
            f"{p['wasted_token_share']:.1%}",
            str(p["max_staleness_trained"]),
            f"{p['mean_staleness_trained']:.2f}",
            str(p["updates"]),
            f"{vs['bubble_ratio']:.2f} / {vs['wall_time']:.2f} / {vs['goodput']:.2f}"
            if vs
            else "-",
        )
    out.print(table)


def _train_help() -> str:
    """`sortedrl train --help`: the engines and tasks as their registries list them."""
    from sortedrl.engines.config import RolloutConfig
    from sortedrl.engines.registry import ENGINES
    from sortedrl.tasks.config import TaskConfig
    from sortedrl.tasks.registry import TASKS

    def names(registry: dict[str, Any], default: str) -> str:
        return ", ".join(f"{n} (default)" if n == default else n for n in registry)

    return (
        "RL-train a model on a task with GRPO; KEY=VALUE overrides settings.\n\n\b\n"
        f"Engines (rollout.engine): {names(ENGINES, RolloutConfig().engine)}.\n"
        f"Tasks (task.name): {names(TASKS, TaskConfig().name)}.\n"
        "Example: sortedrl train scheduler.policy=sync rollout.engine=vllm trainer.lr=5e-5\n"
        "Every setting, its default and its description: sortedrl config"
    )


@main.command(context_settings={"ignore_unknown_options": True}, help=_train_help())
@click.option("--config", "config_path", type=click.Path(), help="YAML file of settings")
@click.option("--out", "out_dir", default="runs/train", show_default=True, help="output folder")
@click.option("--no-progress", is_flag=True, help="no progress bar")
@click.option(
    "--resume",
    default=None,
    help="'auto' (newest complete checkpoint of --out), a run directory or a checkpoint",
)
@click.option("--model", "model_path", default=None, help="a Hugging Face model directory")
@click.option(
    "--overwrite",
    is_flag=True,
    help="replace the run already in --out (its checkpoints and logs are removed first)",
)
@click.argument("overrides", nargs=-1)
@friendly_errors
def train(
    config_path: str | None,
    out_dir: str,
    no_progress: bool,
    resume: str | None,
    model_path: str | None,
    overwrite: bool,
    overrides: tuple[str, ...],
) -> None:
    from sortedrl.commands.train import RunInterrupted
    from sortedrl.commands.train import train as run_train
    from sortedrl.config import load_config

    extra = [f"resume={resume}"] if resume else []
    extra += [f"model.path={model_path}"] if model_path else []
    cfg = load_config(config_path, list(overrides) + extra)
    try:
        s = run_train(cfg, out_dir, progress=not no_progress, overwrite=overwrite)
    except RunInterrupted as e:
        console.print(f"[bold yellow]{e}[/]", highlight=False)
        sys.exit(128 + e.signum)
    b, a = s["eval_before"], s["eval_after"]
    out.print(
        f"eval accuracy {b['accuracy']:.3f} -> {a['accuracy']:.3f}, "
        f"mean reward {b['reward_mean']:.3f} -> {a['reward_mean']:.3f}; "
        f"bubble ratio {s['bubble_ratio']:.1%}; {s['updates']} updates in {s['wall_time_s']:.0f} s"
    )
    console.print(f"wrote {out_dir}/summary.json, metrics.jsonl, report.png, model/, tb/")


@main.command(name="config")
@friendly_errors
def config_command() -> None:
    """Print every `sortedrl train` setting with its default and description, as YAML
    (`sortedrl config > my.yaml`, edit, then `sortedrl train --config my.yaml`)."""
    from sortedrl.config import defaults_yaml

    click.echo(defaults_yaml(), nl=False)


@main.command(name="eval")
@click.option(
    "--model",
    "model_path",
    required=True,
    type=click.Path(),
    help="a model directory, a run directory (its model/, or its newest checkpoint) or a "
    "checkpoint directory",
)
@click.option("--task", "task_name", default="reverse", show_default=True)
@click.option(
    "--path",
    "data_path",
    type=click.Path(),
    help="math, dataset: the problems to score (JSONL, JSON, Parquet, or a saved datasets "
    "directory: its test or validation split)",
)
@click.option("--prompt-key", default=None, help="math, dataset: as task.prompt_key")
@click.option("--answer-key", default=None, help="math, dataset: as task.answer_key")
@click.option(
    "--prompt-template", default=None, help="math, dataset: as task.prompt_template ({problem})"
)
@click.option(
    "--chat-template/--no-chat-template",
    default=True,
    show_default=True,
    help="as task.chat_template: wrap prompts in the tokenizer's chat template",
)
@click.option(
    "--reward-fns",
    multiple=True,
    help="as task.reward_fns: 'package.module:function', once per function",
)
@click.option(
    "--reward-weights",
    type=float,
    multiple=True,
    help="as task.reward_weights: once per --reward-fns",
)
@click.option("--prompts", type=int, default=200, show_default=True)
@click.option("--samples", type=int, default=1, show_default=True, help="k of mean@k")
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0: greedy")
@click.option("--top-p", type=float, default=1.0, show_default=True, help="nucleus sampling")
@click.option("--max-new-tokens", type=int, default=64, show_default=True)
@click.option(
    "--long-prompts",
    type=click.Choice(["error", "drop"]),
    default="error",
    show_default=True,
    help="a prompt too long for the model's context with --max-new-tokens: an error naming "
    "its file and line, or left out (as task.long_prompts)",
)
@click.option("--capacity", type=int, default=64, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1, ...")
@click.option(
    "--engine",
    "engine_name",
    type=click.Choice(["transformers", "vllm"]),
    default="transformers",
    show_default=True,
    help="the engine that generates (vllm: see docs/train.md, the vLLM engine)",
)
@click.option("--json", "json_path", type=click.Path(), help="write the scores here")
@friendly_errors
def eval_command(**kw: Any) -> None:
    """Score a model directory on a task's held-out problems (pass@1 and mean@k), with the
    training run's reward sandbox (worker processes and time limit for math)."""
    from sortedrl.commands.context import check_room, context_positions, fit_prompts
    from sortedrl.commands.evaluate import evaluate, problem_token_ids
    from sortedrl.commands.prepare import (
        checkpoint_model,
        embedded_run_model,
        model_to_evaluate,
        prepare_model,
    )
    from sortedrl.config import load_config
    from sortedrl.io import write_json_atomic
    from sortedrl.tasks.registry import build_task
    from sortedrl.tasks.scoring import make_scorer

    file_flags = [flag for k, flag in FILE_TASK_FLAGS.items() if kw[k] is not None]
    if file_flags and kw["task_name"] not in ("math", "dataset"):
        raise SortedRLError(
            f"{', '.join(file_flags)}: only --task dataset and --task math read files, not "
            f"--task {kw['task_name']}; add --task dataset"
        )
    model_dir, ckpt = model_to_evaluate(Path(kw["model_path"]))
    kw["model_path"] = str(model_dir) if model_dir is not None else None
    cfg = load_config(None, _eval_overrides(kw))
    task = build_task(cfg.task)
    if ckpt is not None:
        model, tokenizer, step, embedded = checkpoint_model(ckpt)
        out.print(f"evaluating the checkpoint {ckpt} (update {step})")
    else:
        model, tokenizer = prepare_model(cfg, task)
        embedded = model_dir is not None and embedded_run_model(model_dir)
    problems = task.problems("test", kw["prompts"], seed=kw["seed"])
    if not problems:
        raise SortedRLError(f"task {kw['task_name']}: no held-out problems")
    # As in training: the embedded tiny model's positions are nominal (rotary, not learned).
    positions = None if embedded else context_positions(model)
    check_room(positions, kw["max_new_tokens"], "--max-new-tokens ")
    problems, dropped = fit_prompts(
        problems,
        lambda p: len(problem_token_ids(tokenizer, p, cfg.task.chat_template)),
        positions,
        kw["max_new_tokens"],
        drop=kw["long_prompts"] == "drop",
        setting="--max-new-tokens ",
    )
    if dropped:
        out.print(f"--long-prompts drop: left out {dropped} prompts too long for the model")
    if not problems:
        raise SortedRLError("--long-prompts drop: no prompt fits the model's context")
    scorer = make_scorer(cfg.task, task)
    try:
        scores = evaluate(
            model,
            tokenizer,
            scorer,
            problems,
            samples=kw["samples"],
            temperature=kw["temperature"],
            top_p=kw["top_p"],
            capacity=kw["capacity"],
            max_new_tokens=kw["max_new_tokens"],
            seed=kw["seed"],
            device=kw["device"],
            engine_name=kw["engine_name"],
            chat_template=cfg.task.chat_template,
        )
    finally:
        scorer.close()
    out.print(
        f"{kw['task_name']}: pass@1 {scores['pass@1']:.3f} (mean@{kw['samples']} at temperature "
        f"{kw['temperature']}), mean reward {scores['reward_mean']:.3f} over "
        f"{len(problems)} problems"
    )
    for name, kinds in scores.get("reward_failures", {}).items():
        counts = ", ".join(f"{k} {n}" for k, n in sorted(kinds.items()))
        out.print(f"reward function {name!r} failed on {sum(kinds.values())} calls ({counts})")
    if kw["json_path"]:
        write_json_atomic(kw["json_path"], scores)


#: `sortedrl eval`'s options that only the tasks reading files (math, dataset) take.
FILE_TASK_FLAGS = {
    "data_path": "--path",
    "prompt_key": "--prompt-key",
    "answer_key": "--answer-key",
    "prompt_template": "--prompt-template",
}


def _eval_overrides(kw: dict[str, Any]) -> list[str]:
    """The `task` and `model` settings of `sortedrl eval`'s options, as train overrides."""
    import json

    overrides = [
        *([f"model.path={kw['model_path']}"] if kw["model_path"] else []),
        f"task.name={kw['task_name']}",
        f"model.device={kw['device']}",
        f"task.chat_template={str(kw['chat_template']).lower()}",
        f"rollout.engine={kw['engine_name']}",  # refused by name where it cannot run
    ]
    if kw["data_path"]:  # every record of the file is held out (of a DatasetDict: its test split)
        overrides.append(f"task.eval_path={kw['data_path']}")
        overrides.append(f"task.path={kw['data_path']}")
    for key in ("prompt_key", "answer_key", "prompt_template"):
        if kw[key] is not None:
            overrides.append(f"task.{key}={kw[key]}")
    if kw["reward_fns"]:
        overrides.append(f"task.reward_fns={json.dumps(list(kw['reward_fns']))}")
    if kw["reward_weights"]:
        overrides.append(f"task.reward_weights={json.dumps(list(kw['reward_weights']))}")
    return overrides


if __name__ == "__main__":
    main()
