"""`sortedrl train` settings: a YAML file plus dotted overrides (`rollout.group_size=8`).

Every section is a pydantic model with documented fields; an unknown or invalid field is an
error that names it (`scheduler.update_batch: ...`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sortedrl.errors import ConfigError, format_validation_error
from sortedrl.scheduling.config import PolicyName, SchedulerConfig
from sortedrl.training.config import TrainerConfig


class ModelSection(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str | None = Field(
        None, description="a Hugging Face model directory; empty: the embedded tiny model"
    )
    tiny_size: str = Field("default", description="size of the embedded tiny model")
    warm_start_steps: int = Field(
        150, ge=0, description="supervised steps on task solutions before RL (tiny model only)"
    )
    warm_start_examples: int = Field(
        2048, ge=1, description="distinct task solutions the warm start draws from"
    )
    warm_start_batch: int = Field(32, ge=1)
    warm_start_lr: float = Field(3e-3, gt=0)
    device: str = Field("cpu", description="cpu, cuda, cuda:1, ...")


class TaskSection(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["reverse", "countdown", "knights_knaves", "math"] = "reverse"
    path: str | None = Field(None, description="math: a JSONL or Parquet file of problems")
    eval_path: str | None = Field(None, description="math: held-out problems (default: path)")
    train_prompts: int = Field(6000, ge=1, description="prompts of RL data (one epoch)")
    eval_prompts: int = Field(200, ge=1, description="held-out prompts per evaluation")
    reward_fn: str | None = Field(
        None, description="your own reward, 'package.module:function(problem, response)'"
    )
    reward_timeout_s: float = Field(5.0, gt=0, description="hard limit per reward call")
    reward_workers: int | None = Field(
        None,
        ge=0,
        description="reward worker processes, each call under a hard time limit; 0 scores "
        "in-process without one; empty: 2 for math and your own reward_fn (untrusted output "
        "meets sympy or unknown code), 0 for the built-in linear-time verifiers",
    )


class RolloutSection(BaseModel):
    model_config = ConfigDict(extra="forbid")
    engine: Literal["transformers", "vllm"] = "transformers"
    group_size: int = Field(8, ge=1, description="responses per prompt (G)")
    capacity: int = Field(64, ge=1, description="engine capacity C: sequences run at once")
    max_new_tokens: int = Field(64, ge=1, description="response length cap")
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    pause_for_update: bool | None = Field(
        None,
        description="pause the engine and free its KV cache for each update, re-prefilling the "
        "partial responses after it (colocated on a GPU); false: keep the cache and go on "
        "under the new weights; empty: pause unless the model runs on the CPU",
    )


class SchedulerSection(BaseModel):
    """See `sortedrl.scheduling.config.SchedulerConfig` for what each field does."""

    model_config = ConfigDict(extra="forbid")
    policy: PolicyName = "sorted"
    rollout_batch: int = Field(32, ge=1)
    update_batch: int = Field(8, ge=1)
    cache: Literal["drop", "keep"] = "keep"
    max_staleness: int = Field(2, ge=0)
    max_regenerations: int = Field(2, ge=0)
    admission: Literal["auto", "round", "fill"] = "auto"
    filter_equal_rewards: bool = False
    submit_order: Literal["fifo", "longest_predicted"] = "fifo"
    update_pacing: bool = False


class EvalSection(BaseModel):
    model_config = ConfigDict(extra="forbid")
    every_updates: int = Field(
        250, ge=0, description="evaluate every N updates, besides before and after (0: never)"
    )
    samples: int = Field(1, ge=1, description="responses per problem (mean@k)")
    temperature: float = Field(0.0, ge=0, description="0: greedy")
    sampled: int = Field(
        4,
        ge=0,
        description="also score this many samples per problem at the rollout temperature "
        "(mean@k, reported as sampled_accuracy); 0: off",
    )


class CheckpointSection(BaseModel):
    model_config = ConfigDict(extra="forbid")
    every_updates: int = Field(
        20, ge=0, description="checkpoint every N updates (0: only at the end)"
    )
    keep: int = Field(3, ge=1, description="newest checkpoints kept")


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    seed: int = 0
    model: ModelSection = ModelSection()
    task: TaskSection = TaskSection()
    rollout: RolloutSection = RolloutSection()
    scheduler: SchedulerSection = SchedulerSection()
    trainer: TrainerConfig = TrainerConfig(lr=1e-4, warmup_steps=2, max_grad_norm=1.0)
    eval: EvalSection = EvalSection()
    checkpoint: CheckpointSection = CheckpointSection()
    resume: str | None = Field(
        None,
        description="'auto': go on from the newest complete checkpoint of the run directory "
        "(or start fresh when there is none); or a run directory or checkpoint to go on from",
    )
    max_updates: int | None = Field(None, ge=1, description="stop after this many updates")
    max_skipped_updates: int = Field(
        3, ge=1, description="stop after this many non-finite (skipped) updates in a row"
    )
    max_engine_restarts: int = Field(
        3, ge=0, description="restarts of a failing rollout engine in a row before giving up"
    )

    def scheduler_config(self) -> SchedulerConfig:
        try:
            return SchedulerConfig(
                **self.scheduler.model_dump(),
                group_size=self.rollout.group_size,
                max_new_tokens=self.rollout.max_new_tokens,
            )
        except ValidationError as e:
            raise ConfigError(format_validation_error(e, "scheduler")) from None


def _parse_value(text: str) -> Any:
    # YAML scalars: 8 -> int, 1e-4 -> float, true -> bool, null -> None, others stay strings.
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str) and text.strip().lower() in ("nan", ".nan"):
        return text
    return value


def apply_override(doc: dict[str, Any], item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override '{item}': expected key=value, e.g. rollout.group_size=8")
    key, value = item.split("=", 1)
    parts = [p for p in key.strip().split(".")]
    if not all(parts):
        raise ConfigError(f"override '{item}': empty key")
    node = doc
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{item}': '{p}' is not a section")
        node = child
    node[parts[-1]] = _parse_value(value)


def load_config(path: str | None, overrides: list[str]) -> TrainConfig:
    doc: dict[str, Any] = {}
    where = "command line"
    if path:
        where = path
        p = Path(path)
        if p.is_dir():
            raise ConfigError(f"{path}: is a directory, not a config file")
        if not p.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f":{mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{path}{line}: invalid YAML: {getattr(e, 'problem', e)}") from None
        except RecursionError:
            raise ConfigError(f"{path}: invalid YAML: nested too deeply") from None
        except ValueError as e:  # e.g. an integer of more than 4300 digits
            raise ConfigError(f"{path}: invalid YAML: {str(e)[:200]}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
        doc = loaded or {}
    for item in overrides:
        apply_override(doc, item)
    try:
        cfg = TrainConfig.model_validate(doc)
    except ValidationError as e:
        raise ConfigError(f"{where}: {format_validation_error(e)}") from None
    try:
        cfg.scheduler_config()  # cross-field checks (update_batch <= rollout_batch) now
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    return cfg
