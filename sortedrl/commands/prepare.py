"""What a run needs before it starts: the model (with the warm-start cache) and the prompts."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sortedrl.config import TrainConfig, saved_config
from sortedrl.errors import ConfigError
from sortedrl.scheduling.state import PromptSpec
from sortedrl.tasks.base import Problem

_CACHE_FORMAT = 1  # bump when the warm start changes meaning
#: The files a Hugging Face tokenizer is saved in (any one may be enough).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "tokenizer.model",
    "spiece.model",
)


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


def prepare_model(cfg: TrainConfig, task: Any) -> tuple[Any, Any]:
    """(model, tokenizer): from `cfg.model.path`, or the embedded tiny model, warm-started on
    reference solutions of the task and cached under $SORTEDRL_CACHE (~/.cache/sortedrl)."""
    if cfg.model.path:
        return _load_hf_model(Path(cfg.model.path))
    from sortedrl.models.tiny import MODEL_SIZES, build_char_tokenizer, build_tiny_model, load_tiny

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
    _store_in_cache(model, tokenizer, target)
    return model, tokenizer


def _load_hf_model(p: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not p.is_dir():
        raise ConfigError(f"model.path: {p} is not a directory")
    if not (p / "config.json").is_file():
        raise ConfigError(f"model.path: {p} is not a model directory (no config.json)")
    no_tokenizer = ConfigError(
        f"model.path: {p} has no tokenizer (none of {', '.join(TOKENIZER_FILES)} gives one); "
        f"save yours beside the model with tokenizer.save_pretrained('{p}')"
    )
    try:
        tokenizer = AutoTokenizer.from_pretrained(p, local_files_only=True)
    except (OSError, ValueError) as e:
        if not any((p / name).is_file() for name in TOKENIZER_FILES):
            raise no_tokenizer from None
        raise ConfigError(f"model.path: cannot load the tokenizer of {p}: {e}") from None
    # Without its files transformers may still build a tokenizer of the model's class, with an
    # empty vocabulary: it encodes every prompt to nothing. The probe has letters and digits,
    # since a task's own vocabulary may have only one kind (the reverse task's: letters).
    probe = "reverse 1 + 1 = 2"
    if len(tokenizer) < 2 or not tokenizer(probe, add_special_tokens=False)["input_ids"]:
        raise no_tokenizer
    try:
        model = AutoModelForCausalLM.from_pretrained(p, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.path: cannot load {p}: {e}") from None
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _store_in_cache(model: Any, tokenizer: Any, target: Path) -> None:
    from sortedrl.models.tiny import save_tiny

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


@dataclass
class RunProblems:
    """The run's problems: the RL ones (also as the controller's prompt specs) and the eval ones."""

    train: list[Problem]
    eval: list[Problem]
    by_id: dict[str, Problem]
    specs: list[PromptSpec]
    #: distinct training records of a task read from files (None for generated tasks)
    train_records: int | None = None
    #: prompts left out as too long for the model (`task.long_prompts=drop`): train, eval
    too_long: dict[str, int] | None = None

    def epochs(self, prompts_trained: int) -> float | None:
        """Passes over the training records after `prompts_trained` prompts (None: generated)."""
        return prompts_trained / self.train_records if self.train_records else None


def problems_of(cfg: TrainConfig, task: Any) -> tuple[list[Problem], list[Problem]]:
    """(train, eval) problems of the task, deterministic in the seed."""
    train = task.problems("train", cfg.task.train_prompts, seed=cfg.seed)
    held_out = task.problems("test", cfg.task.eval_prompts, seed=cfg.seed)
    if not train:
        raise ConfigError("task: no training problems")
    return train, held_out


def train_records(task: Any) -> int | None:
    """Distinct training problems of a task read from files (None for generated tasks)."""
    count = getattr(task, "num_records", None)
    return count("train") if callable(count) else None


def record_id(problem: Problem) -> str:
    """The record a training prompt is drawn from, named by its prompt text: every epoch's
    copy of a record (and a generated problem drawn again) shares it, so the controller's
    length history learns from the earlier ones while each admission keeps its own prompt id."""
    return "rec/" + hashlib.blake2b(problem.prompt.encode("utf-8"), digest_size=8).hexdigest()


def prepare_prompts(
    train: list[Problem],
    held_out: list[Problem],
    tokenizer: Any,
    *,
    chat_template: bool = True,
    records: int | None = None,
    too_long: dict[str, int] | None = None,
) -> RunProblems:
    """Tokenize the RL prompts (through the chat template when there is one and
    `chat_template` is true); `records` is the task's `train_records`."""
    from sortedrl.commands.evaluate import problem_token_ids

    by_id: dict[str, Problem] = {}
    specs = []
    for p in train:
        if p.prompt_id in by_id:
            raise ConfigError(f"task: duplicate prompt id {p.prompt_id!r}")
        by_id[p.prompt_id] = p
        ids = problem_token_ids(tokenizer, p, chat_template)
        epoch = int(p.meta.get("epoch", 0))
        specs.append(PromptSpec(p.prompt_id, len(ids), ids, epoch, record_id(p)))
    return RunProblems(train, held_out, by_id, specs, records, too_long or {"train": 0, "eval": 0})


def embedded_run_model(model_dir: Path) -> bool:
    """Whether `model_dir` is the `model/` a run of the embedded tiny model saved (its
    summary.json beside it says so)."""
    try:
        doc = json.loads((model_dir.parent / "summary.json").read_text(encoding="utf-8"))
        return model_dir.name == "model" and not doc["config"]["model"]["path"]
    except (OSError, ValueError, KeyError, TypeError):
        return False


def model_to_evaluate(path: Path) -> tuple[Path | None, Path | None]:
    """What `sortedrl eval --model PATH` names: (a model directory, None) or (None, a
    checkpoint). PATH may be a model directory, a run directory (its `model/`, or, before
    the run finished, its newest complete checkpoint) or a checkpoint directory."""
    from sortedrl.commands.checkpoint import MANIFEST, complete_checkpoints

    if (path / "config.json").is_file():
        return path, None
    if (path / MANIFEST).is_file():
        return None, path
    if (path / "model" / "config.json").is_file():
        return path / "model", None
    found = complete_checkpoints(path / "checkpoints")
    if found:
        return None, found[-1]
    raise ConfigError(
        f"--model {path}: not a model directory, a run directory or a checkpoint (no "
        "config.json, model/config.json, checkpoints/step-*/ or MANIFEST.json)"
    )


def checkpoint_model(ckpt: Path) -> tuple[Any, Any, int | None, bool]:
    """(model, tokenizer, step, embedded) of a training checkpoint: the run's model as its
    settings built it (your model directory, or, `embedded`, the tiny model), with the
    checkpoint's weights."""
    from safetensors.torch import load_model

    from sortedrl.commands.checkpoint import load_checkpoint
    from sortedrl.tasks.registry import build_task

    loaded = load_checkpoint(ckpt)
    settings = loaded.run.get("settings") if isinstance(loaded.run, dict) else None
    try:
        cfg = saved_config(settings)
    except Exception as e:
        raise ConfigError(f"{ckpt}/run.json: the run's settings do not load ({e})") from None
    # The weights come from the checkpoint: the embedded model needs no warm start here.
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"warm_start_steps": 0})})
    model, tokenizer = prepare_model(cfg, None if cfg.model.path else build_task(cfg.task))
    try:
        if loaded.weights is not None:
            load_model(model, str(loaded.weights))
        else:  # a checkpoint of trainer ranks: the weights are in their shards
            from sortedrl.cluster.trainers import tied_aliases
            from sortedrl.training.distributed import load_checkpoint_weights

            assert loaded.trainer_dcp is not None  # load_checkpoint: one or the other
            load_checkpoint_weights(model, loaded.trainer_dcp, tied_aliases(model))
    except (RuntimeError, ValueError, OSError) as e:
        raise ConfigError(f"{ckpt}: its weights do not fit the run's model ({e})") from None
    return model.eval(), tokenizer, loaded.step, not cfg.model.path
