"""`sortedrl train` settings: a YAML file plus dotted overrides (`scheduler.group_size=8`).

Every section is a pydantic model with documented fields; an unknown or invalid field is an
error that names it (`scheduler.update_batch: ...`).
"""

from __future__ import annotations

from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from sortedrl.cluster.config import ClusterConfig
from sortedrl.engines.factory import check_engine_name, check_engine_settings
from sortedrl.errors import ConfigError, format_validation_error
from sortedrl.scheduling.config import SchedulerConfig
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
    """What to train on and how it is scored; `dataset` and `math` read your files
    (`sortedrl.tasks.dataset`)."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["reverse", "countdown", "knights_knaves", "math", "dataset"] = "reverse"
    path: str | None = Field(
        None,
        description="math, dataset: training data, a JSONL, JSON or Parquet file or a directory "
        "saved with datasets' save_to_disk (of a DatasetDict: its train split)",
    )
    eval_path: str | None = Field(
        None,
        description="math, dataset: held-out data in the same formats (of a DatasetDict: its "
        "test or validation split); empty: the held-out split of a saved DatasetDict at path, "
        "or else 10% of path's records, chosen by a hash of the prompt",
    )
    prompt_key: str | None = Field(
        None,
        description="math, dataset: the column holding the prompt; empty: 'problem' or "
        "'question' (any case)",
    )
    answer_key: str | None = Field(
        None,
        description="math, dataset: the column holding the reference answer (a \\boxed{} in it "
        "gives the boxed part); empty: 'answer', or the last \\boxed{} of 'solution'",
    )
    prompt_template: str | None = Field(
        None,
        description="math, dataset: the text given to the model, with {problem} standing for "
        "the prompt column; '': the prompt as it is; empty: the task's own (math: the prompt "
        "and 'Please reason step by step, and put your final answer within \\boxed{}.'; "
        "dataset: the prompt as it is)",
    )
    chat_template: bool = Field(
        True,
        description="wrap each prompt in the tokenizer's chat template as a user message, where "
        "the tokenizer has one; false: the prompt's tokens as they are (BOS prepended)",
    )
    train_prompts: int = Field(
        6000,
        ge=1,
        description="prompts of RL data; a file with fewer records is gone through again, "
        "reshuffled, and each pass is an epoch (`epoch` in metrics.jsonl, `epochs` in "
        "summary.json)",
    )
    eval_prompts: int = Field(200, ge=1, description="held-out prompts per evaluation")
    reward_fns: list[str] = Field(
        default_factory=list,
        description="your own rewards, each 'package.module:function', either "
        "fn(problem, response) -> float or TRL's fn(completions, **kwargs) -> list[float] (the "
        "dataset's other columns come as keyword lists); summed with reward_weights; empty: "
        "the task's own verifier",
    )
    reward_weights: list[float] | None = Field(
        None, description="one weight per reward_fns entry; empty: 1 each"
    )
    reward_timeout_s: float = Field(5.0, gt=0, description="hard limit per reward call")
    reward_workers: int | None = Field(
        None,
        ge=0,
        description="reward worker processes, each call under a hard time limit; 0 scores "
        "in-process without one; empty: 2 for math, dataset and your own reward_fns "
        "(untrusted output meets sympy or unknown code), 0 for the built-in linear-time "
        "verifiers",
    )

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        if isinstance(data, dict) and "reward_fn" in data:
            raise ValueError(
                "reward_fn is now reward_fns, a list: task.reward_fns=['package.module:function']"
            )
        return data

    @model_validator(mode="after")
    def _consistent(self) -> TaskSection:
        reads_files = self.name in ("math", "dataset")
        if reads_files and not self.path:
            raise ValueError(f"task {self.name!r} needs task.path (a data file or directory)")
        if not reads_files:
            given = [
                k
                for k in ("path", "eval_path", "prompt_key", "answer_key", "prompt_template")
                if getattr(self, k) is not None
            ]
            if given:
                raise ValueError(
                    f"{', '.join(given)}: only the math and dataset tasks read files, not "
                    f"{self.name!r}"
                )
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward_fns):
            raise ValueError(
                f"reward_weights has {len(self.reward_weights)} entries for "
                f"{len(self.reward_fns)} reward_fns"
            )
        if self.prompt_template and "{problem}" not in self.prompt_template:
            raise ValueError("prompt_template must contain {problem} (or be '' for the raw prompt)")
        return self


class RolloutSection(BaseModel):
    model_config = ConfigDict(extra="forbid")
    engine: Literal["transformers", "vllm"] = "transformers"
    capacity: int = Field(
        64,
        ge=1,
        description="engine capacity C: sequences run at once (per replica: the replica pool of "
        "cluster.rollout_replicas runs their sum)",
    )
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    pause_for_update: bool | None = Field(
        None,
        description="pause the engine and free its KV cache for each update, re-prefilling the "
        "partial responses after it (colocated on a GPU); false: keep the cache and go on "
        "under the new weights; empty: pause unless the model runs on the CPU",
    )
    # Engine memory and precision. vLLM honours all of them; the transformers engine honours
    # `dtype` and refuses the others (its KV cache grows with the batch, it has no graphs).
    dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = Field(
        None,
        description="the rollout engine's precision; auto: the model's own dtype; empty: "
        "float32 on the CPU, auto on a GPU (vLLM), the trainer's precision (transformers)",
    )
    kv_cache_gib: float | None = Field(
        None,
        gt=0,
        description="vLLM: the KV cache's memory per replica in GiB; empty: 0.25 on the CPU "
        "(VLLM_CPU_KVCACHE_SPACE in the environment takes precedence), and on a GPU what "
        "gpu_memory_utilization leaves after the weights and activations",
    )
    gpu_memory_utilization: float | None = Field(
        None,
        gt=0,
        le=1,
        description="vLLM on a GPU, with kv_cache_gib empty: the share of each GPU's memory "
        "vLLM may take for weights, activations and KV cache; empty: 0.5 (a colocated trainer "
        "rank needs the rest; raise it to about 0.9 with cluster.layout=separate). Refused "
        "on the CPU, where rollout.kv_cache_gib sizes the cache",
    )
    max_model_len: int | None = Field(
        None,
        ge=1,
        description="vLLM: the most tokens of prompt + response a sequence may hold (its KV "
        "cache is planned for that length); empty: the model's max_position_embeddings",
    )
    enforce_eager: bool | None = Field(
        None,
        description="vLLM: run without CUDA graphs (less memory, slower decode); empty: true "
        "on the CPU (vLLM's CPU build has no graphs), false on a GPU",
    )
    enable_prefix_caching: bool = Field(
        False,
        description="vLLM: reuse the KV blocks of shared prompt prefixes (a group's samples "
        "share their prompt); the cache is reset at every weight load, since blocks computed "
        "under old weights are wrong under new ones",
    )


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


class LoggingSection(BaseModel):
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


class CheckpointSection(BaseModel):
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
    model: ModelSection = ModelSection()
    task: TaskSection = TaskSection()
    rollout: RolloutSection = RolloutSection()
    scheduler: SchedulerConfig = Field(
        SchedulerConfig(),
        description="policy, batches, staleness and response cap (group_size, max_new_tokens)",
    )
    trainer: TrainerConfig = TrainerConfig(lr=1e-4, warmup_steps=2, max_grad_norm=1.0)
    eval: EvalSection = EvalSection()
    cluster: ClusterConfig = Field(
        ClusterConfig(), description="where replicas and trainer ranks run (local or Ray)"
    )
    checkpoint: CheckpointSection = CheckpointSection()
    logging: LoggingSection = LoggingSection()
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
        check_engine_settings(self.rollout, self.cluster, self.model.device)
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
        check_engine_name(cfg.rollout.engine)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    return cfg
