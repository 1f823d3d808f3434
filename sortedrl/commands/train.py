"""`sortedrl train`: GRPO on a task with a rollout engine under a scheduling policy.

Outputs in `out_dir`:

* `metrics.jsonl`: one line per update (step, policy_version, reward_mean, accuracy, ...);
* `trace.jsonl`: the lengths of every trained group (`sortedrl simulate --trace` replays it);
* `tb/`: the same scalars for TensorBoard (and Weights & Biases with `logging.wandb=true`);
* `model/`: the final model and tokenizer (Hugging Face format, safetensors);
* `report.png`: reward / accuracy per update and the engine occupancy over time;
* `checkpoints/`: see `sortedrl.commands.checkpoint`;
* `summary.json`: eval_before, eval_after, bubble_ratio, wall_time_s and the run summary.

The pieces: `prepare` (model and prompts), `run` (the run object: update hook, checkpoints,
engine restarts), `logger` (every log), `runstate` (what a checkpoint adds to the weights).
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path
from typing import Any

from sortedrl.commands.checkpoint import MANIFEST, Checkpoint, latest_checkpoint, load_checkpoint
from sortedrl.commands.context import check_room, context_positions, fit_prompts
from sortedrl.commands.evaluate import evaluate_run, problem_token_ids
from sortedrl.commands.logger import RunLogger
from sortedrl.commands.prepare import prepare_model, prepare_prompts, problems_of, train_records
from sortedrl.commands.run import NumericalError, RewardFunctionError, Run, RunInterrupted
from sortedrl.commands.runstate import RunState
from sortedrl.config import TrainConfig
from sortedrl.errors import ConfigError
from sortedrl.io import write_json_atomic
from sortedrl.scheduling.controller import Controller
from sortedrl.scheduling.protocol import CheckpointedTrainer
from sortedrl.tasks.registry import build_task
from sortedrl.tasks.reward_report import FailureConsole
from sortedrl.tasks.scoring import make_scorer

__all__ = ["NumericalError", "RewardFunctionError", "RunInterrupted", "expected_updates", "train"]

#: What a run writes into its output folder; a new run refuses a folder holding any of them.
RUN_OUTPUTS = (
    "checkpoints",
    "metrics.jsonl",
    "trace.jsonl",
    "summary.json",
    "tb",
    "model",
    "report.png",
)


def train(
    cfg: TrainConfig, out_dir: str | Path, progress: bool = True, overwrite: bool = False
) -> dict[str, Any]:
    import torch
    from transformers.utils import logging as hf_logging

    from sortedrl.cluster.backend import evaluates_on_replicas
    from sortedrl.commands.backend import make_backend

    hf_logging.disable_progress_bar()  # no "Writing model shards" bars in the run's output
    t_start = time.perf_counter()
    out = Path(out_dir)
    task = build_task(cfg.task)  # a bad data file is reported before anything is written
    train_problems, eval_problems = problems_of(cfg, task)
    records = train_records(task)
    if progress and records and cfg.task.train_prompts > records:
        print(
            f"task.train_prompts={cfg.task.train_prompts} over {records} training records: "
            f"{cfg.task.train_prompts / records:.2f} epochs, reshuffled each time"
        )
    # A previous run in `out` is refused now; with --overwrite it is removed only once
    # everything below has been checked and built, just before the logs are opened.
    previous = previous_run(out, resume=bool(cfg.resume), overwrite=overwrite)
    resumed = find_resume(cfg, out / "checkpoints")
    # Settings first: a checkpoint of another model is refused before its weights are read.
    state = resumed_state(cfg, resumed) if resumed else RunState(settings=run_settings(cfg))
    if resumed:
        print(f"resuming from {resumed.path} at update {len(state.history)}")

    torch.manual_seed(cfg.seed)
    model, tokenizer = prepare_model(cfg, task)
    if resumed:
        load_weights(model, resumed)
    t_model = time.perf_counter() - t_start
    scorer = make_scorer(cfg.task, task)
    console = FailureConsole()  # your reward functions' first failures, train and eval alike
    backend = None
    try:
        train_problems, eval_problems, too_long = fit_to_context(
            cfg, model, tokenizer, train_problems, eval_problems
        )
        problems = prepare_prompts(
            train_problems,
            eval_problems,
            tokenizer,
            chat_template=cfg.task.chat_template,
            records=records,
            too_long=too_long,
        )
        if state.eval_before is None and not evaluates_on_replicas(cfg):
            state.eval_before = evaluate_run(cfg, model, tokenizer, scorer, eval_problems, console)
            state.evals.append({"step": 0, **state.eval_before})

        backend = make_backend(cfg)  # ray: connects and reserves the devices
        trainer = backend.trainer(model)
        model.train()
        controller = start_controller(cfg, problems.specs, trainer, resumed)
        remove_run(out, previous)  # all is checked and built: the first write into `out`
        logger = RunLogger(
            cfg,
            out,
            metrics_lines=len(state.history),
            trace_lines=state.trace_lines,
            resumed=resumed is not None,
            total_updates=expected_updates(cfg),
            progress=progress,
        )
        try:
            run = Run(
                cfg,
                out,
                model=model,
                tokenizer=tokenizer,
                problems=problems,
                scorer=scorer,
                trainer=trainer,
                backend=backend,
                controller=controller,
                state=state,
                logger=logger,
                t_start=t_start,
                console=console,
            )
            if state.eval_before is None:  # on the replicas, now that they run
                state.eval_before = run.evaluate()
                state.evals.append({"step": 0, **state.eval_before})
            if resumed:
                run.restore_rng(resumed.trainer_state["rng"])
            result = run.execute(pause_for_update=pause_for_update(cfg))

            eval_after = run.finish(out, result)
        finally:
            logger.finish()
    finally:
        if backend is not None:
            backend.close()
        scorer.close()

    resumed_from = str(resumed.path) if resumed else None
    summary = run.summary(result, eval_after, resumed_from=resumed_from, model_time_s=t_model)
    write_json_atomic(str(out / "summary.json"), summary)
    return summary


def expected_updates(cfg: TrainConfig) -> int:
    n = math.ceil(cfg.task.train_prompts / cfg.scheduler_config().update_batch)
    return min(n, cfg.max_updates) if cfg.max_updates else n


def pause_for_update(cfg: TrainConfig) -> bool:
    """`rollout.pause_for_update`, or its default: pause unless the model runs on the CPU."""
    if cfg.rollout.pause_for_update is not None:
        return cfg.rollout.pause_for_update
    return not str(cfg.model.device).startswith("cpu")  # a CPU has memory to spare


def claim_out_dir(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Make `out` this run's folder at once (see `previous_run` and `remove_run`)."""
    remove_run(out, previous_run(out, resume=resume, overwrite=overwrite))


def previous_run(out: Path, *, resume: bool, overwrite: bool) -> list[str]:
    """The outputs of a previous run in `out` that `--overwrite` is to remove. A folder holding
    another run is refused, unless the run goes on from it (`--resume`) or replaces it
    (`--overwrite`), so two runs never mix their logs or checkpoints."""
    if resume and overwrite:
        raise ConfigError("--overwrite and --resume exclude each other: choose one")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: is a file, not a folder")
    found = [name for name in RUN_OUTPUTS if (out / name).exists()]
    if found and not resume:
        if not overwrite:
            raise ConfigError(
                f"--out {out}: holds a previous run ({', '.join(found)}); go on from it with "
                "--resume auto, replace it with --overwrite, or choose another --out"
            )
        return found
    return []


def remove_run(out: Path, found: list[str]) -> None:
    """Remove the previous run's outputs `found` (`previous_run`) and make sure `out` exists."""
    for name in found:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    out.mkdir(parents=True, exist_ok=True)


def fit_to_context(
    cfg: TrainConfig, model: Any, tokenizer: Any, train: list[Any], held_out: list[Any]
) -> tuple[list[Any], list[Any], dict[str, int]]:
    """The problems whose prompt and responses fit the model's positions (see
    `sortedrl.commands.context`); `task.long_prompts` says whether the others are an error or
    dropped, and how many were dropped is returned (and printed)."""
    # Your model's positions; the embedded tiny model's are rotary, never learned, and its
    # config's 512 is nominal (the knights_knaves prompts run past it by design).
    positions = context_positions(model) if cfg.model.path else None
    max_new = cfg.scheduler_config().max_new_tokens
    check_room(positions, max_new, "scheduler.max_new_tokens=")

    def length(p: Any) -> int:
        return len(problem_token_ids(tokenizer, p, cfg.task.chat_template))

    drop = cfg.task.long_prompts == "drop"
    kw = dict(drop=drop, setting="scheduler.max_new_tokens=")
    kept_train, n_train = fit_prompts(train, length, positions, max_new, **kw)
    kept_eval, n_eval = fit_prompts(held_out, length, positions, max_new, **kw)
    if n_train or n_eval:
        print(
            f"task.long_prompts=drop: dropped {n_train} of {len(train)} training prompts and "
            f"{n_eval} of {len(held_out)} held-out prompts longer than the model's {positions} "
            f"positions less scheduler.max_new_tokens={max_new}"
        )
    if not kept_train:
        raise ConfigError(
            f"task.long_prompts=drop: no training prompt fits the model's {positions} positions "
            f"with scheduler.max_new_tokens={max_new}"
        )
    return kept_train, kept_eval, {"train": n_train, "eval": n_eval}


def find_resume(cfg: TrainConfig, ckpt_root: Path) -> Checkpoint | None:
    """The checkpoint to go on from, per `cfg.resume`; damaged ones are skipped with a warning."""
    if not cfg.resume:
        return None
    if cfg.resume == "auto":
        root = ckpt_root
    else:
        given = Path(cfg.resume)
        if (given / MANIFEST).is_file():
            return load_checkpoint(given)
        root = given / "checkpoints" if (given / "checkpoints").is_dir() else given
        if not root.is_dir():
            raise ConfigError(f"resume: {given} is not a run directory or checkpoint")
    found, warnings = latest_checkpoint(root)
    for w in warnings:
        print(f"warning: {w}")
    if found is None and cfg.resume != "auto":
        raise ConfigError(f"resume: no complete checkpoint under {root}")
    return found


def resumed_state(cfg: TrainConfig, resumed: Checkpoint) -> RunState:
    """The checkpoint's run state, once its settings are known to match `cfg`'s."""
    try:
        state = RunState.from_json(resumed.run, f"{resumed.path}/run.json")
    except ValueError as e:
        raise ConfigError(f"cannot resume: {e}") from None
    now = run_settings(cfg)
    if state.settings != now:
        diff = sorted(_flat_diff(state.settings, now))
        raise ConfigError(
            f"cannot resume from {resumed.path}: settings differ from the checkpointed "
            f"run's ({', '.join(diff)}); resume with the same settings or start a new --out"
        )
    return state


def load_weights(model: Any, resumed: Checkpoint) -> None:
    """The checkpoint's weights into the driver's `model`; none for a checkpoint of trainer
    ranks, whose shards hold them: the ranks restore those (`start_controller`) and hand the
    driver the weights it needs."""
    from safetensors.torch import load_model

    if resumed.weights is None:
        return
    try:
        load_model(model, str(resumed.weights))
    except (RuntimeError, ValueError, OSError) as e:
        raise ConfigError(
            f"cannot resume from {resumed.path}: its weights do not fit the model ({str(e)[:300]})"
        ) from None


def start_controller(
    cfg: TrainConfig, specs: list[Any], trainer: CheckpointedTrainer, resumed: Checkpoint | None
) -> Controller:
    """A fresh controller over `specs`, or the checkpoint's (and its trainer state restored)."""
    if not resumed:
        return Controller(cfg.scheduler_config(), specs)
    try:
        controller = Controller(cfg.scheduler_config(), specs)
        controller.load_state_dict(resumed.controller)
    except ValueError as e:
        raise ConfigError(f"cannot resume from {resumed.path}: {e}") from None
    trainer_dcp = None if resumed.trainer_dcp is None else str(resumed.trainer_dcp)
    try:
        trainer.load_checkpoint(trainer_dcp, resumed.trainer_state["trainer"])
    except ValueError as e:
        raise ConfigError(f"cannot resume from {resumed.path}: {e}") from None
    return controller


def run_settings(cfg: TrainConfig) -> dict[str, Any]:
    """What a resumed run must share with the checkpointed one (not how it is run)."""
    doc = cfg.model_dump(mode="json")
    for key in (
        "resume",
        "checkpoint",
        "logging",
        "max_updates",
        "max_skipped_updates",
        "max_engine_failures",
        "cluster",  # a run may go on with another layout: its checkpoint does not depend on it
    ):
        doc.pop(key, None)
    return doc


def _flat_diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for k in sorted(set(a) | set(b)):
            out += _flat_diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]
