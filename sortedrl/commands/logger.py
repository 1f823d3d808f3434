"""The run's logger: `metrics.jsonl`, `trace.jsonl`, TensorBoard, the progress bar, the report
plot and, with `logging.wandb=true`, Weights & Biases. One object owns all of them.

A resumed run keeps the first lines of each log (those its checkpoint accounts for) and writes
the rest again.
"""

from __future__ import annotations

import json
import os
from collections import deque
from pathlib import Path
from typing import Any

from sortedrl.config import TrainConfig
from sortedrl.errors import ConfigError

#: Updates the progress bar's figures are the means of: one update alone says little (the
#: last update of a `sorted` round holds its longest and hardest groups).
RUNNING_MEAN_UPDATES = 10


class RunLogger:
    def __init__(
        self,
        cfg: TrainConfig,
        out: Path,
        *,
        metrics_lines: int,
        trace_lines: int,
        resumed: bool,
        total_updates: int,
        progress: bool,
    ) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.wandb = _start_wandb(cfg, out) if cfg.logging.wandb else None
        # A resumed run drops what was logged after its checkpoint: those updates run again.
        self.tb = SummaryWriter(
            log_dir=str(out / "tb"), purge_step=metrics_lines + 1 if resumed else None
        )
        self.metrics = _open_log(out / "metrics.jsonl", metrics_lines if resumed else 0)
        # The lengths of every trained group: `sortedrl simulate --trace` replays them.
        self.trace = _open_log(out / "trace.jsonl", trace_lines)
        self.trace_lines = trace_lines
        self.bar = _progress_bar(progress)
        done = metrics_lines if resumed else 0  # a resumed run's bar starts where it goes on
        self._bar_task = self.bar.add_task("train", total=total_updates, completed=done, info="")
        self._recent: deque[tuple[float, float, float]] = deque(maxlen=RUNNING_MEAN_UPDATES)

    def __enter__(self) -> RunLogger:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.__exit__(*exc)

    def update(self, line: dict[str, Any], group_lengths: list[tuple[str, list[int]]]) -> None:
        """One update's metrics line and the lengths of the groups it trained."""
        self.metrics.write(json.dumps(line) + "\n")
        self.metrics.flush()
        for prompt_id, lengths in group_lengths:
            self.trace.write(json.dumps({"prompt_id": prompt_id, "lengths": lengths}) + "\n")
            self.trace_lines += 1
        self.trace.flush()
        scalars = {
            k if "/" in k else f"rl/{k}": v
            for k, v in line.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and k != "step"
        }
        for k, v in scalars.items():
            self.tb.add_scalar(k, v, line["step"])
        if self.wandb is not None:
            self.wandb.log(scalars, step=line["step"])
        self._recent.append((line["reward_mean"], line["accuracy"], line["response_len_mean"]))
        reward, acc, length = (sum(x) / len(self._recent) for x in zip(*self._recent, strict=True))
        self.bar.update(
            self._bar_task,
            advance=1,
            info=f"reward {reward:.3f} acc {acc:.2f} len {length:.0f} "
            f"(mean of {len(self._recent)} updates)",
        )

    def evals(self, before: dict[str, Any], after: dict[str, Any], step: int) -> None:
        """The held-out scores before and after training."""
        for k in ("accuracy", "reward_mean", "response_len_mean"):
            self.tb.add_scalar(f"eval/{k}", before[k], 0)
            self.tb.add_scalar(f"eval/{k}", after[k], step)
        if self.wandb is not None:
            self.wandb.summary.update(
                {f"eval_before/{k}": v for k, v in before.items() if _is_number(v)}
                | {f"eval_after/{k}": v for k, v in after.items() if _is_number(v)}
            )

    def close_logs(self) -> None:
        """Close the JSONL logs (idempotent); TensorBoard and W&B stay open for the evals."""
        self.metrics.close()
        self.trace.close()

    def finish(self) -> None:
        self.close_logs()
        self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None

    def report(
        self,
        path: Path,
        history: list[dict[str, Any]],
        evals: list[dict[str, Any]],
        clock: Any,
        capacity: int,
    ) -> None:
        """`report.png`; a failure is a warning, never the end of the run."""
        times, occupancy = clock.timeline.series()
        try:
            plot_report(path, history, evals, times, occupancy, capacity)
        except Exception as e:
            print(f"warning: report.png not written: {e}")


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _start_wandb(cfg: TrainConfig, out: Path) -> Any:
    """A W&B run (offline when WANDB_MODE=offline, which wandb reads itself)."""
    try:
        import wandb
    except ImportError:
        raise ConfigError(
            "logging.wandb: true needs the wandb package; pip install wandb "
            "(or set logging.wandb=false)"
        ) from None
    return wandb.init(
        project=cfg.logging.wandb_project,
        name=cfg.logging.wandb_run_name or out.resolve().name,
        config=cfg.model_dump(mode="json"),
        dir=str(out),
        mode=os.environ.get("WANDB_MODE") or None,
    )


def _progress_bar(enabled: bool) -> Any:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("updates"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not enabled,
    )


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
