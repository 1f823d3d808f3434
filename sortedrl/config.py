"""`sortedrl train` settings: a YAML file plus dotted overrides (`scheduler.group_size=8`).

This module assembles `TrainConfig` from the sections, each declared in the layer that reads
it (`engines/config.py`: model, rollout; `tasks/config.py`: task; `scheduling/config.py`,
`training/config.py`, `cluster/config.py`), and holds the run's own sections (eval,
checkpoint, logging) and the overrides. Every section is a pydantic model with documented
fields; an unknown or invalid field is an error that names it (`scheduler.update_batch: ...`).
"""

from __future__ import annotations

from pathlib import Path
from types import UnionType
from typing import Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from sortedrl.cluster.config import ClusterConfig
from sortedrl.engines.config import ModelConfig, RolloutConfig
from sortedrl.engines.factory import check_engine_name, check_engine_settings
from sortedrl.errors import ConfigError, format_validation_error
from sortedrl.scheduling.config import SchedulerConfig
from sortedrl.tasks.config import TaskConfig
from sortedrl.training.config import TrainerConfig
from sortedrl.trl_names import trl_hint


class EvalConfig(BaseModel):
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


class LoggingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    wandb: bool = Field(
        False,
        description="also log to Weights & Biases (pip install wandb); offline when the "
        "environment sets WANDB_MODE=offline",
    )
    wandb_project: str = Field("sortedrl", description="Weights & Biases project")
    wandb_run_name: str | None = Field(
        None, description="Weights & Biases run name; empty: the output folder's name"
    )


class CheckpointConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    every_updates: int = Field(
        20, ge=0, description="checkpoint every N updates (0: only at the end)"
    )
    keep: int = Field(3, ge=1, description="newest checkpoints kept")


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    seed: int = Field(
        0, description="the run's seed: data, model init, sampling, the trainer's mini-batches"
    )
    model: ModelConfig = ModelConfig()
    task: TaskConfig = TaskConfig()
    rollout: RolloutConfig = RolloutConfig()
    scheduler: SchedulerConfig = Field(
        SchedulerConfig(),
        description="policy, batches, staleness and response cap (group_size, max_new_tokens)",
    )
    trainer: TrainerConfig = TrainerConfig(lr=1e-4, warmup_steps=2, max_grad_norm=1.0)
    eval: EvalConfig = EvalConfig()
    cluster: ClusterConfig = Field(
        ClusterConfig(), description="where replicas and trainer ranks run (local or Ray)"
    )
    checkpoint: CheckpointConfig = CheckpointConfig()
    logging: LoggingConfig = LoggingConfig()
    resume: str | None = Field(
        None,
        description="'auto': go on from the newest complete checkpoint of the run directory "
        "(or start fresh when there is none); or a run directory or checkpoint to go on from",
    )
    max_updates: int | None = Field(None, ge=1, description="stop after this many updates")
    max_skipped_updates: int = Field(
        3, ge=1, description="stop after this many non-finite (skipped) updates in a row"
    )
    max_engine_failures: int = Field(
        3,
        ge=1,
        description="stop (with a checkpoint) when the rollout engine fails this many times in "
        "a row; it is restarted after each earlier failure",
    )

    @model_validator(mode="after")
    def _engine_honours_settings(self) -> TrainConfig:
        check_engine_settings(self.rollout, self.model, self.cluster.tensor_parallel_size)
        return self

    def scheduler_config(self) -> SchedulerConfig:
        """The scheduler's settings, validated with the rest of the config."""
        return self.scheduler


def _wants_text(parts: list[str]) -> bool:
    """Whether the field at `parts` holds free text (a path, a name): such a value is taken as
    written, so `model.path=2024` or `resume=on` stay strings."""
    model: Any = TrainConfig
    for i, p in enumerate(parts):
        fields = getattr(model, "model_fields", None)
        if not fields or p not in fields:
            return False
        ann = fields[p].annotation
        if i == len(parts) - 1:
            args = set(get_args(ann)) if get_origin(ann) in (Union, UnionType) else {ann}
            return str in args and not args & {bool, int, float}
        model = ann
    return False


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
        raise ConfigError(f"override '{item}': expected key=value, e.g. scheduler.group_size=8")
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
    if _wants_text(parts):
        node[parts[-1]] = None if value.strip() in ("", "null", "~") else value
    else:
        node[parts[-1]] = _parse_value(value)


def _trl_hints(e: ValidationError) -> list[str]:
    """For each unknown setting that is one of TRL's names, where sortedrl's is."""
    hints = []
    for err in e.errors():
        loc = [str(x) for x in err.get("loc", ())]
        if err.get("type") == "extra_forbidden" and loc:
            hint = trl_hint(loc[-1])
            if hint is not None:
                hints.append(f"{'.'.join(loc)}: {hint}")
    return hints


def saved_config(settings: dict[str, Any]) -> TrainConfig:
    """The TrainConfig of a run from the settings it saved (run.json's `settings`, a dump of
    every field): the scheduler section is read back through `SchedulerConfig.from_saved`."""
    doc = dict(settings)
    if isinstance(doc.get("scheduler"), dict):
        doc["scheduler"] = SchedulerConfig.from_saved(doc["scheduler"])
    return TrainConfig.model_validate(doc)


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
        hints = _trl_hints(e)
        if hints:
            raise ConfigError(f"{where}: {'; '.join(hints)}") from None
        raise ConfigError(f"{where}: {format_validation_error(e)}") from None
    try:
        check_engine_name(cfg.rollout.engine)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    return cfg


def defaults_yaml() -> str:
    """Every `sortedrl train` setting with its default, as a YAML file of sections, each
    field preceded by its description as a comment (`sortedrl config`). Loading it back gives
    the defaults."""
    lines = [
        "# sortedrl train: every setting and its default. Edit and pass with --config FILE,",
        "# or set one on the command line as a dotted override (scheduler.group_size=8).",
        "",
    ]
    _describe(TrainConfig(), lines, indent="")
    return "\n".join(lines) + "\n"


def _describe(model: BaseModel, lines: list[str], indent: str) -> None:
    import textwrap

    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        if field.description:
            width = max(40, 96 - len(indent))
            for text in textwrap.wrap(field.description, width):
                lines.append(f"{indent}# {text}")
        if isinstance(value, BaseModel):
            lines.append(f"{indent}{name}:")
            _describe(value, lines, indent + "  ")
            continue
        dumped = yaml.safe_dump(
            {name: value if not isinstance(value, tuple) else list(value)},
            default_flow_style=True,
            sort_keys=False,
            width=10_000,
        ).strip()
        if dumped.startswith("{") and dumped.endswith("}"):
            dumped = dumped[1:-1]
        lines.append(f"{indent}{dumped}")
