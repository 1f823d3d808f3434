"""`task` settings: what to train on and how it is scored."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from sortedrl.tasks.registry import TASKS

# The task names, derived from the registry: a new task is one entry there.
TaskName = Literal[tuple(TASKS)]  # type: ignore[valid-type]
_FILE_TASKS = [name for name, entry in TASKS.items() if entry.reads_files]


class TaskConfig(BaseModel):
    """What to train on and how it is scored; `dataset` and `math` read your files
    (`sortedrl.tasks.dataset`)."""

    model_config = ConfigDict(extra="forbid")
    name: TaskName = Field("reverse", description=f"the task: {', '.join(TASKS)}")
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
    long_prompts: Literal["error", "drop"] = Field(
        "error",
        description="a prompt whose tokens plus scheduler.max_new_tokens exceed the model's "
        "max_position_embeddings: 'error' names its file and line before any work; 'drop' "
        "leaves it out and counts it (prompts_too_long in summary.json)",
    )
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
    reward_timeout_s: float = Field(
        5.0, gt=0, description="hard limit per call of a reward function (or the verifier)"
    )
    reward_fail_updates: int = Field(
        3,
        ge=0,
        description="stop the run (with a checkpoint and the function's message) when one of "
        "your reward_fns failed on every call for this many updates in a row; 0: never stop, "
        "only count (reward_failures/<fn>/<kind> in metrics.jsonl)",
    )
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
    def _consistent(self) -> TaskConfig:
        reads_files = TASKS[self.name].reads_files
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
                    f"{', '.join(given)}: only the {' and '.join(_FILE_TASKS)} tasks read files, not "
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
