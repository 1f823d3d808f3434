"""`sortedrl train`: GRPO on a task with the transformers rollout engine under a scheduling
policy, with metrics (JSONL, TensorBoard), evaluation before/after, a report PNG and the model.

Outputs in `out_dir`:

* `metrics.jsonl`: one line per update (step, policy_version, reward_mean, accuracy, ...);
* `tb/`: the same scalars for TensorBoard;
* `model/`: the final model and tokenizer (Hugging Face format, safetensors);
* `report.png`: reward / accuracy per update and the engine occupancy over time;
* `summary.json`: eval_before, eval_after, bubble_ratio, wall_time_s and the run summary.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import random
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

from sortedrl.commands.checkpoint import (
    MANIFEST,
    complete_checkpoints,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from sortedrl.config import TrainConfig
from sortedrl.errors import ConfigError, SortedRLError
from sortedrl.io import write_json_atomic
from sortedrl.scheduling.controller import controller_state
from sortedrl.scheduling.loop import EngineFailedError
from sortedrl.tasks.base import Problem, Score

_CACHE_FORMAT = 1  # bump when the warm start changes meaning


# --- task and model ---------------------------------------------------------------------------


def build_task(cfg: TrainConfig) -> Any:
    from sortedrl.tasks.registry import build_task as build

    return build(cfg.task)


def cache_root() -> Path:
    env = os.environ.get("SORTEDRL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "sortedrl"


def _warm_start_problems(cfg: TrainConfig, task: Any) -> list[Problem]:
    # Train-split problems, drawn with their own seed so the warm start covers more of the
    # distribution than the RL prompts alone.
    return task.problems("train", cfg.model.warm_start_examples, seed=cfg.seed + 7919)


def tiny_cache_key(cfg: TrainConfig, task: Any) -> str:
    doc = {
        "format": _CACHE_FORMAT,
        "task": repr(task),
        "alphabet": task.alphabet,
        "size": cfg.model.tiny_size,
        "steps": cfg.model.warm_start_steps,
        "batch": cfg.model.warm_start_batch,
        "lr": cfg.model.warm_start_lr,
        "seed": cfg.seed,
        "n": cfg.model.warm_start_examples,
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def prepare_model(cfg: TrainConfig, task: Any | None = None) -> tuple[Any, Any]:
    """(model, tokenizer): from `cfg.model.path`, or the embedded tiny model, warm-started on
    reference solutions of the task and cached under $SORTEDRL_CACHE (~/.cache/sortedrl)."""
    if cfg.model.path:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        p = Path(cfg.model.path)
        if not p.is_dir():
            raise ConfigError(f"model.path: {p} is not a directory")
        if not (p / "config.json").is_file():
            raise ConfigError(f"model.path: {p} is not a model directory (no config.json)")
        try:
            tokenizer = AutoTokenizer.from_pretrained(p, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(p, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ConfigError(f"model.path: cannot load {p}: {e}") from None
        if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
            tokenizer.pad_token = tokenizer.eos_token
        return model, tokenizer

    from sortedrl.models.tiny import (
        MODEL_SIZES,
        build_char_tokenizer,
        build_tiny_model,
        load_tiny,
        save_tiny,
    )

    task = task if task is not None else build_task(cfg)
    alphabet = getattr(task, "alphabet", None)
    if not alphabet:
        raise ConfigError(
            f"model.path: task {cfg.task.name!r} has no fixed alphabet for the embedded tiny "
            "model; give a Hugging Face model directory"
        )
    if cfg.model.tiny_size not in MODEL_SIZES:
        raise ConfigError(
            f"model.tiny_size: unknown size {cfg.model.tiny_size!r}; "
            f"choose one of {', '.join(sorted(MODEL_SIZES))}"
        )
    target = cache_root() / f"tiny-{tiny_cache_key(cfg, task)}"
    if (target / "config.json").is_file():
        try:
            return load_tiny(target)
        except Exception:  # a damaged cache entry: rebuild it
            shutil.rmtree(target, ignore_errors=True)

    tokenizer = build_char_tokenizer(alphabet)
    model = build_tiny_model(len(tokenizer), cfg.seed, cfg.model.tiny_size)
    if cfg.model.warm_start_steps > 0:
        from sortedrl.training.sft import supervised_warm_start

        examples = [(p.prompt, task.reference_solution(p)) for p in _warm_start_problems(cfg, task)]
        supervised_warm_start(
            model,
            tokenizer,
            examples,
            steps=cfg.model.warm_start_steps,
            batch_size=cfg.model.warm_start_batch,
            lr=cfg.model.warm_start_lr,
            seed=cfg.seed,
            device=cfg.model.device,
        )
    model.to("cpu").eval()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-tiny-"))
        try:
            save_tiny(model, tokenizer, tmp)
            os.replace(tmp, target)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)  # another process won the race
    except OSError:
        pass  # an unwritable cache is not fatal
    return model, tokenizer


# --- the run ----------------------------------------------------------------------------------


def _eval(cfg: TrainConfig, model: Any, tokenizer: Any, task: Any, problems: list[Problem]):
    from sortedrl.commands.evaluate import evaluate

    def score(samples: int, temperature: float) -> dict[str, Any]:
        return evaluate(
            model,
            tokenizer,
            task,
            problems,
            samples=samples,
            temperature=temperature,
            capacity=cfg.rollout.capacity,
            max_new_tokens=cfg.rollout.max_new_tokens,
            seed=cfg.seed,
            device=cfg.model.device,
            chat_template=cfg.task.chat_template,
        )

    result = score(cfg.eval.samples, cfg.eval.temperature)
    if cfg.eval.sampled:
        sampled = score(cfg.eval.sampled, cfg.rollout.temperature)
        result["sampled_accuracy"] = sampled["accuracy"]
        result["sampled_reward_mean"] = sampled["reward_mean"]
    return result


def _make_score_fn(cfg: TrainConfig, task: Any) -> tuple[Any, Any]:
    """(scorer with score_batch, closer)."""
    from sortedrl.tasks.scoring import make_scorer

    runner = make_scorer(cfg.task, task)
    return runner, runner.close


def _train_records(task: Any) -> int | None:
    """Distinct training problems of a task read from files (None for generated tasks)."""
    count = getattr(task, "num_records", None)
    return count("train") if callable(count) else None


def expected_updates(cfg: TrainConfig) -> int:
    n = math.ceil(cfg.task.train_prompts / cfg.scheduler.update_batch)
    return min(n, cfg.max_updates) if cfg.max_updates else n


def train(cfg: TrainConfig, out_dir: str | Path, progress: bool = True) -> dict[str, Any]:
    import torch
    from transformers.utils import logging as hf_logging

    from sortedrl.commands.evaluate import decode, prompt_token_ids
    from sortedrl.engines.transformers_engine import TransformersEngine
    from sortedrl.scheduling.controller import Controller
    from sortedrl.scheduling.loop import run
    from sortedrl.scheduling.state import PromptSpec
    from sortedrl.training.trainer import GRPOTrainer

    hf_logging.disable_progress_bar()  # no "Writing model shards" bars in the run's output
    t_start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sched_cfg = cfg.scheduler_config()
    task = build_task(cfg)
    train_problems = task.problems("train", cfg.task.train_prompts, seed=cfg.seed)
    eval_problems = task.problems("test", cfg.task.eval_prompts, seed=cfg.seed)
    if not train_problems:
        raise ConfigError("task: no training problems")
    train_records = _train_records(task)
    if progress and train_records and cfg.task.train_prompts > train_records:
        print(
            f"task.train_prompts={cfg.task.train_prompts} over {train_records} training records: "
            f"{cfg.task.train_prompts / train_records:.2f} epochs, reshuffled each time"
        )

    torch.manual_seed(cfg.seed)
    model, tokenizer = prepare_model(cfg, task)
    ckpt_root = out / "checkpoints"
    resumed = _find_resume(cfg, ckpt_root)
    if resumed is not None:
        from safetensors.torch import load_model

        load_model(model, str(resumed["weights"]))
    t_model = time.perf_counter() - t_start
    device = cfg.model.device

    run_state: dict[str, Any] = resumed["run"] if resumed else {}
    if resumed and run_state.get("settings") not in (None, _run_settings(cfg)):
        old, new = run_state["settings"], _run_settings(cfg)
        diff = sorted(_flat_diff(old, new))
        raise ConfigError(
            f"cannot resume from {resumed['path']}: settings differ from the checkpointed "
            f"run's ({', '.join(diff)}); resume with the same settings or start a new --out"
        )
    evals: list[dict[str, Any]] = run_state.get("evals", [])
    if resumed:
        eval_before = run_state["eval_before"]
    else:
        eval_before = _eval(cfg, model, tokenizer, task, eval_problems)
        evals.append({"step": 0, **eval_before})

    problems_by_id: dict[str, Problem] = {}
    specs = []
    for p in train_problems:
        if p.prompt_id in problems_by_id:
            raise ConfigError(f"task: duplicate prompt id {p.prompt_id!r}")
        problems_by_id[p.prompt_id] = p
        ids = prompt_token_ids(tokenizer, p.prompt, cfg.task.chat_template)
        specs.append(PromptSpec(p.prompt_id, len(ids), ids))

    def make_engine(version: int) -> TransformersEngine:
        e = TransformersEngine(
            copy.deepcopy(model),
            tokenizer,
            capacity=cfg.rollout.capacity,
            temperature=cfg.rollout.temperature,
            top_p=cfg.rollout.top_p,
            seed=cfg.seed,
            device=device,
        )
        e.load_weights(None, version)  # serves the current policy version
        return e

    trainer = GRPOTrainer(model, cfg.trainer, device=device)
    model.train()
    scores: dict[tuple[str, int], Any] = {}
    if resumed:
        from sortedrl.scheduling.controller import restore_controller

        try:
            controller = restore_controller(sched_cfg, specs, resumed["controller"])
        except ValueError as e:
            raise ConfigError(f"cannot resume from {resumed['path']}: {e}") from None
        trainer.load_state_dict(resumed["trainer"]["trainer"])
        rng = resumed["trainer"]["rng"]
        torch.set_rng_state(rng["torch"])
        random.setstate(_to_tuple(rng["python"]))
        engine = make_engine(controller.version)
        engine.generator.set_state(rng["engine"])
        for pid, idx, reward, correct, fmt in run_state["scores"]:
            scores[(pid, idx)] = Score(reward, correct, fmt)
    else:
        controller = Controller(sched_cfg, specs)
        engine = make_engine(0)
    current = {"engine": engine}

    score_fn, close_scorer = _make_score_fn(cfg, task)

    def scorer(generations, keys):
        t0 = time.perf_counter()
        items = [
            (problems_by_id[pid], decode(tokenizer, g.token_ids))
            for g, (pid, _) in zip(generations, keys, strict=True)
        ]
        if hasattr(score_fn, "score_batch"):
            results = score_fn.score_batch(items)
        else:
            results = [score_fn.score(p, r) for p, r in items]
        for key, s in zip(keys, results, strict=True):
            scores[tuple(key)] = s
        return [float(s.reward) for s in results], time.perf_counter() - t0

    from torch.utils.tensorboard import SummaryWriter

    history: list[dict[str, Any]] = run_state.get("history", [])
    samples_trained = run_state.get("samples_trained", 0)
    prompts_trained = sum(h["groups"] for h in history)
    # A resumed run drops what was logged after its checkpoint: those updates run again.
    writer = SummaryWriter(
        log_dir=str(out / "tb"), purge_step=len(history) + 1 if resumed else None
    )
    metrics_file = _open_log(out / "metrics.jsonl", len(history) if resumed else 0)
    # The lengths of every trained group: `sortedrl simulate --trace` replays them.
    trace_file = _open_log(out / "trace.jsonl", run_state.get("trace_lines", 0))
    trace_lines = run_state.get("trace_lines", 0)
    skipped_in_a_row = 0
    elapsed_before = run_state.get("elapsed_s", 0.0)
    total = expected_updates(cfg)

    def checkpoint(step: int) -> Path:
        state = {
            "trainer": trainer.state_dict(),
            "rng": {
                "torch": torch.get_rng_state(),
                "engine": current["engine"].generator.get_state(),
                "python": _to_lists(random.getstate()),
            },
        }
        run = {
            "eval_before": eval_before,
            "evals": evals,
            "history": history,
            "samples_trained": samples_trained,
            "trace_lines": trace_lines,
            "elapsed_s": elapsed_before + time.perf_counter() - t_start,
            "scores": [[k[0], k[1], v.reward, v.correct, v.format_ok] for k, v in scores.items()],
            "settings": _run_settings(cfg),
        }
        return save_checkpoint(
            ckpt_root,
            step,
            model=model,
            trainer_state=state,
            controller_state=controller_state(controller),
            run_state=run,
            keep=cfg.checkpoint.keep,
        )

    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    bar = Progress(
        TextColumn("updates"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not progress,
    )
    bar_task = bar.add_task("train", total=total, info="")

    def on_update(record, batch, result) -> None:
        nonlocal samples_trained, prompts_trained, trace_lines, skipped_in_a_row
        n_correct = n = 0
        for g in batch.groups:
            for s in g.samples:
                sc = scores.pop((g.prompt_id, s.sample_index), None)
                n += 1
                n_correct += int(bool(sc is not None and sc.correct))
        samples_trained += record.samples
        prompts_trained += record.groups
        line: dict[str, Any] = {
            "step": record.step,
            "policy_version": record.policy_version,
            "reward_mean": record.reward_mean,
            "accuracy": n_correct / n if n else 0.0,
            "response_len_mean": record.response_len_mean,
            "bubble_ratio": record.bubble_ratio,
            "max_staleness_trained": record.max_staleness_trained,
            "mean_staleness_trained": record.mean_staleness_trained,
            "groups": record.groups,
            "samples": record.samples,
            "tokens": record.tokens,
            "samples_trained": samples_trained,
            "skipped": record.skipped,
            # Passes over the training records so far (trained prompts / records).
            "epoch": prompts_trained / train_records if train_records else None,
            "time_s": elapsed_before + time.perf_counter() - t_start,
            "loop_time_s": record.time_s,
        }
        for k, v in record.stats.items():
            if isinstance(v, int | float) and not isinstance(v, bool):
                line[f"train/{k}"] = float(v)
        if cfg.eval.every_updates and record.step % cfg.eval.every_updates == 0:
            ev = _eval(cfg, model, tokenizer, task, eval_problems)
            evals.append({"step": record.step, **ev})
            line["eval_accuracy"] = ev["accuracy"]
            line["eval_reward_mean"] = ev["reward_mean"]
        history.append(line)
        metrics_file.write(json.dumps(line) + "\n")
        metrics_file.flush()
        for g in batch.groups:
            lengths = [s.n_tokens for s in g.samples]
            trace_file.write(json.dumps({"prompt_id": g.prompt_id, "lengths": lengths}) + "\n")
            trace_lines += 1
        trace_file.flush()
        for k, v in line.items():
            if isinstance(v, int | float) and not isinstance(v, bool) and k != "step":
                writer.add_scalar(k if "/" in k else f"rl/{k}", v, record.step)
        bar.update(
            bar_task,
            advance=1,
            info=f"reward {record.reward_mean:.3f} acc {line['accuracy']:.2f} "
            f"len {record.response_len_mean:.0f}",
        )
        skipped_in_a_row = skipped_in_a_row + 1 if record.skipped else 0
        if skipped_in_a_row >= cfg.max_skipped_updates:
            last = complete_checkpoints(ckpt_root)
            raise NumericalError(
                f"{skipped_in_a_row} updates in a row had a non-finite loss or gradient and "
                f"were skipped; stopping. "
                + (f"The last checkpoint, {last[-1]}, is intact." if last else "")
            )
        every = cfg.checkpoint.every_updates
        if every and record.step % every == 0 and controller.colocated:
            running = current["engine"]
            if running.num_unfinished():  # the engine kept its responses over the update
                controller.stop(running.pause())  # they resume first, after the checkpoint
            checkpoint(record.step)  # nothing runs now: the state is complete

    pause_for_update = cfg.rollout.pause_for_update
    if pause_for_update is None:  # a CPU has memory to spare: keep the KV cache over updates
        pause_for_update = not str(device).startswith("cpu")

    def restart_engine() -> TransformersEngine:
        current["engine"] = make_engine(controller.version)
        return current["engine"]

    # SIGTERM / SIGINT: stop at the next engine step, checkpoint, exit.
    stop_signal: list[int] = []
    previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            previous[sig] = signal.signal(sig, lambda signum, frame: stop_signal.append(signum))
        except ValueError:  # not the main thread: no signal handling
            pass
    try:
        with bar:
            result = run(
                controller,
                engine,
                trainer,
                scorer=scorer,
                on_update=on_update,
                max_updates=cfg.max_updates,
                should_stop=lambda: bool(stop_signal),
                restart_engine=restart_engine,
                max_engine_restarts=cfg.max_engine_restarts,
                pause_for_update=pause_for_update,
            )
    except EngineFailedError as e:
        where = checkpoint(len(history))
        raise SortedRLError(f"{e}; checkpoint written to {where}; resume with --resume auto") from e
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        metrics_file.close()
        trace_file.close()
        close_scorer()
    engine = result.engine
    final_ckpt = checkpoint(len(history))
    if result.stopped:
        raise RunInterrupted(
            stop_signal[0],
            f"stopped by {signal.Signals(stop_signal[0]).name} after {len(history)} updates; "
            f"checkpoint written to {final_ckpt}; go on with --resume auto",
        )

    model.eval()
    eval_after = _eval(cfg, model, tokenizer, task, eval_problems)
    if not evals or evals[-1]["step"] != len(history):
        evals.append({"step": len(history), **eval_after})
    for k in ("accuracy", "reward_mean", "response_len_mean"):
        writer.add_scalar(f"eval/{k}", eval_before[k], 0)
        writer.add_scalar(f"eval/{k}", eval_after[k], len(history))
    writer.close()

    model_dir = out / "model"
    model.save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)

    times, occupancy = result.clock.timeline.series()
    try:
        plot_report(out / "report.png", history, evals, times, occupancy, engine.capacity)
    except Exception as e:  # a report is not worth losing the run over
        print(f"warning: report.png not written: {e}")

    summary = {
        **result.summary,
        "loop_time_s": result.summary["wall_time_s"],
        "wall_time_s": elapsed_before + time.perf_counter() - t_start,
        "resumed_from": str(resumed["path"]) if resumed else None,
        "model_time_s": t_model,
        "eval_before": eval_before,
        "eval_after": eval_after,
        "evals": evals,
        "train_records": train_records,
        "epochs": prompts_trained / train_records if train_records else None,
        "bubble_ratio": result.summary["bubble_ratio"],
        "engine_stats": dict(engine.stats),
        "config": cfg.model_dump(mode="json"),
        "out_dir": str(out),
    }
    write_json_atomic(str(out / "summary.json"), summary)
    return summary


class NumericalError(SortedRLError):
    """Too many non-finite updates in a row."""


class RunInterrupted(SortedRLError):
    """SIGTERM or SIGINT: the run was checkpointed and can go on with --resume."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum


def _find_resume(cfg: TrainConfig, ckpt_root: Path) -> dict[str, Any] | None:
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


def _run_settings(cfg: TrainConfig) -> dict[str, Any]:
    """What a resumed run must share with the checkpointed one (not how it is run)."""
    doc = cfg.model_dump(mode="json")
    for key in (
        "resume",
        "checkpoint",
        "max_updates",
        "max_skipped_updates",
        "max_engine_restarts",
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


def _open_log(path: Path, keep_lines: int) -> Any:
    """Open a JSONL log for appending after its first `keep_lines` lines (the rest is dropped:
    a resumed run writes those lines again)."""
    kept: list[str] = []
    if keep_lines and path.is_file():
        with open(path, encoding="utf-8") as f:
            for _, line in zip(range(keep_lines), f, strict=False):
                kept.append(line)
    f = open(path, "w", encoding="utf-8")  # noqa: SIM115
    f.writelines(kept)
    f.flush()
    return f


def _to_lists(x: Any) -> Any:
    return [_to_lists(v) for v in x] if isinstance(x, tuple | list) else x


def _to_tuple(x: Any) -> Any:
    return tuple(_to_tuple(v) for v in x) if isinstance(x, list) else x


def plot_report(
    path: Path,
    history: list[dict[str, Any]],
    evals: list[dict[str, Any]],
    times: list[float],
    occupancy: list[float],
    capacity: int,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 7))
    steps = [h["step"] for h in history]
    ax1.plot(steps, [h["reward_mean"] for h in history], label="train reward")
    ax1.plot(steps, [h["accuracy"] for h in history], label="train accuracy")
    if evals:
        ax1.plot(
            [e["step"] for e in evals], [e["accuracy"] for e in evals], "o--", label="eval accuracy"
        )
    ax1.set_xlabel("update")
    ax1.set_ylim(-0.02, 1.02)
    ax1.legend(loc="best")
    ax1.set_title("reward and accuracy")
    ax2.plot(times, occupancy, drawstyle="steps-post")
    ax2.axhline(capacity, color="grey", linestyle=":", label=f"capacity {capacity}")
    ax2.set_xlabel("run loop time (s)")
    ax2.set_ylabel("running sequences")
    ax2.set_title("engine occupancy")
    ax2.legend(loc="best")
    fig.tight_layout()
    tmp = path.with_name(f".tmp-{path.name}")
    fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
