"""The `sortedrl` command line."""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from typing import Any

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


@main.command()
@click.option("--preset", default="llama3.1-8b-h100", show_default=True, help="cost-model preset")
@click.option(
    "--policies",
    default="sync,sorted-drop,sorted-keep,partial,async",
    show_default=True,
    help="comma-separated: sync, sorted, partial, async (sorted-drop / sorted-keep pick the cache)",
)
@click.option("--trace", type=click.Path(), help="JSONL trace of recorded response lengths")
@click.option("--lengths", help="length spec, e.g. 'lognormal:median=1500,sigma=1.0'")
@click.option("--prompts", type=int, default=2048, show_default=True)
@click.option("--group-size", type=int, default=None, help="G (default 8, or the trace's)")
@click.option("--rollout-batch", type=int, default=320, show_default=True)
@click.option("--update-batch", type=int, default=128, show_default=True)
@click.option("--cache", type=click.Choice(["drop", "keep"]), default="keep", show_default=True)
@click.option("--max-staleness", type=int, default=2, show_default=True)
@click.option("--max-regenerations", type=int, default=2, show_default=True)
@click.option(
    "--admission",
    type=click.Choice(["auto", "round", "fill"]),
    default="auto",
    show_default=True,
    help="sorted: auto = round for drop, fill for keep",
)
@click.option("--async-rollout-gpus", type=int, default=None, help="default: best of all splits")
@click.option(
    "--epochs",
    type=int,
    default=1,
    show_default=True,
    help="passes over the prompts; each draws fresh lengths from the prompt's distribution",
)
@click.option(
    "--submit-order",
    type=click.Choice(["fifo", "longest_predicted"]),
    default="fifo",
    show_default=True,
    help="queue order within a priority class (SchedulerConfig.submit_order)",
)
@click.option(
    "--update-pacing/--no-update-pacing",
    default=False,
    show_default=True,
    help="sorted: hold updates back by the pacing cost model (SchedulerConfig.update_pacing)",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "json_path", type=click.Path(), help="write the results here")
@click.option("--plot", "plot_path", type=click.Path(), help="write a PNG here")
@friendly_errors
def simulate(**kw: Any) -> None:
    """Compare scheduling policies on the simulated engine at paper scale, in virtual time."""
    from sortedrl.engines.costmodel import get_preset
    from sortedrl.io import write_json_atomic
    from sortedrl.sim.simulate import (
        SimSettings,
        build_workload,
        parse_policies,
        simulate,
    )

    spec = get_preset(kw["preset"])
    policies = parse_policies(kw["policies"])
    workload = build_workload(
        trace=kw["trace"],
        lengths=kw["lengths"],
        prompts=kw["prompts"],
        group_size=kw["group_size"],
        spec=spec,
        seed=kw["seed"],
    )
    settings = SimSettings(
        preset=kw["preset"],
        policies=policies,
        prompts=kw["prompts"],
        group_size=workload.group_size,
        rollout_batch=kw["rollout_batch"],
        update_batch=kw["update_batch"],
        cache=kw["cache"],
        max_staleness=kw["max_staleness"],
        max_regenerations=kw["max_regenerations"],
        admission=kw["admission"],
        seed=kw["seed"],
        async_rollout_gpus=kw["async_rollout_gpus"],
        epochs=kw["epochs"],
        submit_order=kw["submit_order"],
        update_pacing=kw["update_pacing"],
    )
    with Progress(
        TextColumn("{task.description:>12}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("prompts trained"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as bar:
        tasks = {p: bar.add_task(p, total=kw["prompts"] * kw["epochs"]) for p in policies}
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


def _print_sim_table(doc: dict[str, Any]) -> None:
    s = doc["settings"]
    table = Table(
        title=f"{s['preset']}: {s['prompts']} prompts x G={s['group_size']}, "
        f"R={s['rollout_batch']}, U={s['update_batch']}, max_staleness={s['max_staleness']}"
    )
    cols = [
        ("policy", None),
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


@main.command(context_settings={"ignore_unknown_options": True})
@click.option("--config", "config_path", type=click.Path(), help="YAML file of settings")
@click.option("--out", "out_dir", default="runs/train", show_default=True, help="output folder")
@click.option("--no-progress", is_flag=True, help="no progress bar")
@click.option(
    "--resume",
    default=None,
    help="'auto' (newest complete checkpoint of --out), a run directory or a checkpoint",
)
@click.option("--model", "model_path", default=None, help="a Hugging Face model directory")
@click.argument("overrides", nargs=-1)
@friendly_errors
def train(
    config_path: str | None,
    out_dir: str,
    no_progress: bool,
    resume: str | None,
    model_path: str | None,
    overrides: tuple[str, ...],
) -> None:
    """RL-train a model on a task (GRPO, transformers engine); KEY=VALUE overrides settings,
    e.g. `rollout.group_size=8 scheduler.policy=sync`."""
    from sortedrl.commands.train import RunInterrupted
    from sortedrl.commands.train import train as run_train
    from sortedrl.config import load_config

    extra = [f"resume={resume}"] if resume else []
    extra += [f"model.path={model_path}"] if model_path else []
    cfg = load_config(config_path, list(overrides) + extra)
    try:
        s = run_train(cfg, out_dir, progress=not no_progress)
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


@main.command(name="eval")
@click.option("--model", "model_path", required=True, type=click.Path(), help="model directory")
@click.option("--task", "task_name", default="reverse", show_default=True)
@click.option("--path", "data_path", type=click.Path(), help="math: a JSONL/Parquet eval file")
@click.option("--prompts", type=int, default=200, show_default=True)
@click.option("--samples", type=int, default=1, show_default=True, help="k of mean@k")
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0: greedy")
@click.option("--max-new-tokens", type=int, default=64, show_default=True)
@click.option("--capacity", type=int, default=64, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "json_path", type=click.Path(), help="write the scores here")
@friendly_errors
def eval_command(**kw: Any) -> None:
    """Score a model directory on a task's held-out problems (pass@1 and mean@k)."""
    from sortedrl.commands.evaluate import evaluate
    from sortedrl.commands.train import build_task, prepare_model
    from sortedrl.config import load_config
    from sortedrl.io import write_json_atomic

    overrides = [f"model.path={kw['model_path']}", f"task.name={kw['task_name']}"]
    if kw["data_path"]:
        overrides.append(f"task.eval_path={kw['data_path']}")
        overrides.append(f"task.path={kw['data_path']}")
    cfg = load_config(None, overrides)
    task = build_task(cfg)
    model, tokenizer = prepare_model(cfg, task)
    problems = task.problems("test", kw["prompts"], seed=kw["seed"])
    if not problems:
        raise SortedRLError(f"task {kw['task_name']}: no held-out problems")
    scores = evaluate(
        model,
        tokenizer,
        task,
        problems,
        samples=kw["samples"],
        temperature=kw["temperature"],
        capacity=kw["capacity"],
        max_new_tokens=kw["max_new_tokens"],
        seed=kw["seed"],
    )
    out.print(
        f"{kw['task_name']}: pass@1 {scores['pass@1']:.3f} (mean@{kw['samples']} at temperature "
        f"{kw['temperature']}), mean reward {scores['reward_mean']:.3f} over "
        f"{len(problems)} problems"
    )
    if kw["json_path"]:
        write_json_atomic(kw["json_path"], scores)


if __name__ == "__main__":
    main()
