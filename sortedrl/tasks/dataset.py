"""Your own data as a task (`task.name=dataset`); the `math` task is this with its own prompt.

A record needs a prompt and, unless your reward functions need none, a reference answer:

* the prompt is the column `prompt_key`; by default ``problem`` or ``question`` (matched
  case-insensitively, as in some AIME dumps);
* the answer is the column `answer_key`; by default ``answer``, or else the last
  ``\\boxed{...}`` of a ``solution``. A number becomes text. A named answer column whose text
  holds a ``\\boxed{...}`` gives the boxed part.

Every other column is kept with the problem (``meta["columns"]``): TRL-style reward functions
receive them as keyword lists, as `GRPOTrainer` passes them.

The prompt given to the model is `prompt_template` with ``{problem}`` replaced by the prompt;
``""`` gives the prompt as it is. The `dataset` task's default is the raw prompt.

Held-out problems come from `eval_path`; without it, from the held-out split of a saved
DatasetDict when it has one, or else the records are split by a hash of the prompt text
(`test_percent` of them held out), so the splits are disjoint and stable.

`problems(split, n, seed)` shuffles with `seed` and goes through the split again, reshuffled,
when `n` is larger than the split: each pass is an epoch, recorded as ``meta["epoch"]``
(0 for the first) and counted by `sortedrl train` (``epoch`` in each metrics line, ``epochs`` in
the summary).

Default verifier (:func:`score_answer`): the final answer is the last ``\\boxed{...}``, else what
follows the last "answer is" / "Answer:", else (dataset task only) the response's last
non-empty line; it is compared with the reference by math-verify (exact text first), or, when
the reference is plain words (letters and spaces, two letters at least), as text ignoring
case. Reward 1.0 when they match, else 0.0.
"""

from __future__ import annotations

import math
import random
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sortedrl.errors import ConfigError, InputFileError
from sortedrl.tasks.answers import (
    REWARD_CORRECT,
    REWARD_WRONG,
    answers_match,
    extract_answer,
    last_boxed,
    warmup,
)
from sortedrl.tasks.base import Problem, Score
from sortedrl.tasks.data import HELD_OUT_SPLITS, read_rows, saved_splits

PROMPT_KEYS = ("problem", "question", "prompt")
MAX_RESPONSE_CHARS = 200_000
RAW_PROMPT = ""
_PLAIN_WORDS = re.compile(r"[A-Za-z]{2,}(?: [A-Za-z]+)*")  # text answers: compared as text


@dataclass(frozen=True)
class Record:
    problem: str  # the prompt text, before the template
    answer: str  # "" when the data has none and none is needed
    source: str  # "path:line" for messages
    columns: dict[str, Any] = field(default_factory=dict)  # every column but the prompt's
    #: a conversational prompt's {role, content} messages (then `problem` is their text)
    messages: tuple[dict[str, str], ...] | None = None


def _lookup(obj: dict[str, Any], names: tuple[str, ...]) -> tuple[str, Any] | None:
    lowered = {k.lower(): k for k in obj if isinstance(k, str)}
    for name in names:
        if name in lowered:
            return lowered[name], obj[lowered[name]]
    return None


def _answer_text(value: Any, path: str, line: int, key: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise InputFileError(
            path, f"must be a string or a number, got {type(value).__name__}", line, key
        )
    if isinstance(value, float) and not math.isfinite(value):
        raise InputFileError(path, f"must be a finite number, got {value}", line, key)
    text = str(value).strip()
    boxed = last_boxed(text) if isinstance(value, str) else None
    if boxed is not None and boxed.strip():
        text = boxed.strip()
    if not text:
        raise InputFileError(path, "is empty", line, key)
    return text


def _messages(value: list[Any], path: str, line: int, name: str) -> tuple[dict[str, str], ...]:
    """A conversational prompt (TRL's form): a list of {"role", "content"} string pairs."""
    if not value:
        raise InputFileError(path, "is an empty list of messages", line, name)
    out = []
    for i, m in enumerate(value, start=1):
        if not (
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
        ):
            raise InputFileError(
                path,
                f"message {i}: needs 'role' and 'content' strings, got {str(m)[:60]}",
                line,
                name,
            )
        out.append({"role": m["role"], "content": m["content"]})
    return tuple(out)


def messages_text(messages: tuple[dict[str, str], ...]) -> str:
    """A conversational prompt as one text (`Problem.prompt`): a line per message."""
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def _prompt(
    obj: dict[str, Any], key: str | None, path: str, line: int
) -> tuple[str, str, tuple[dict[str, str], ...] | None]:
    if key is None:
        found = _lookup(obj, PROMPT_KEYS)
        if found is None:
            need = "missing (need 'problem' or 'question', or set task.prompt_key)"
            raise InputFileError(path, need, line, "problem")
    elif key in obj:
        found = (key, obj[key])
    else:
        raise InputFileError(path, "missing (task.prompt_key)", line, key)
    name, text = found
    if isinstance(text, list):
        messages = _messages(text, path, line, name)
        return name, messages_text(messages), messages
    if not isinstance(text, str):
        raise InputFileError(
            path,
            f"must be a string, got {type(text).__name__} (or a list of {{role, content}} "
            "messages)",
            line,
            name,
        )
    if not text.strip():
        raise InputFileError(path, "is empty", line, name)
    return name, text, None


def _answer(obj: dict[str, Any], key: str | None, required: bool, path: str, line: int) -> str:
    if key is not None:
        if key not in obj:
            raise InputFileError(path, "missing (task.answer_key)", line, key)
        return _answer_text(obj[key], path, line, key)
    found = _lookup(obj, ("answer",))
    if found is not None:
        return _answer_text(found[1], path, line, found[0])
    sol = _lookup(obj, ("solution",))
    if sol is None:
        if not required:
            return ""
        raise InputFileError(
            path, "missing (need 'answer', or a 'solution' with \\boxed{})", line, "answer"
        )
    name, solution = sol
    if not isinstance(solution, str):
        raise InputFileError(path, f"must be a string, got {type(solution).__name__}", line, name)
    boxed = last_boxed(solution)
    if boxed is None or not boxed.strip():
        raise InputFileError(path, "has no \\boxed{...} answer", line, name)
    return boxed.strip()


def to_record(
    obj: Any,
    path: str,
    line: int,
    prompt_key: str | None = None,
    answer_key: str | None = None,
    answer_required: bool = True,
) -> Record:
    """One row as a Record; a bad row raises InputFileError naming the file, line and field."""
    if not isinstance(obj, dict):
        raise InputFileError(path, f"expected a JSON object, got {type(obj).__name__}", line=line)
    name, text, messages = _prompt(obj, prompt_key, path, line)
    answer = _answer(obj, answer_key, answer_required, path, line)
    columns = {k: v for k, v in obj.items() if k != name}
    return Record(text, answer, f"{path}:{line}", columns, messages)


def score_answer(problem: Problem, response: str, last_line: bool = True) -> Score:
    """The default verifier (module-level, picklable); see the module docstring."""
    if not isinstance(response, str) or len(response) > MAX_RESPONSE_CHARS:
        return Score(REWARD_WRONG, False, False)
    pred = extract_answer(response)
    if pred is None and last_line:
        lines = [x.strip() for x in response.strip().splitlines() if x.strip()]
        pred = lines[-1] if lines else None
    if pred is None or not problem.answer:
        return Score(REWARD_WRONG, False, pred is not None)
    if _PLAIN_WORDS.fullmatch(problem.answer.strip()):
        # A word is not a product of symbols: math-verify would take "abc" and "cba" as equal.
        correct = pred.strip().lower() == problem.answer.strip().lower()
    else:
        correct = answers_match(problem.answer, pred)
    return Score(REWARD_CORRECT if correct else REWARD_WRONG, correct, True)


@dataclass(frozen=True)
class DatasetTask:
    """Prompts and answers from your files; see the module docstring."""

    path: str
    eval_path: str | None = None
    prompt_key: str | None = None
    answer_key: str | None = None
    prompt_template: str = RAW_PROMPT
    answer_required: bool = True
    test_percent: int = 10
    name: str = "dataset"
    _records: dict[str, list[Record]] = field(default_factory=dict, compare=False, repr=False)

    # The verifier takes the last line as the answer when nothing marks one (a raw prompt's
    # model answers plainly); `math` asks for \boxed{} and does not.
    answer_from_last_line = True

    def __post_init__(self) -> None:
        if self.prompt_template and "{problem}" not in self.prompt_template:
            raise ConfigError(
                f"task.prompt_template: must contain '{{problem}}' (or be empty for the raw "
                f"prompt), got {self.prompt_template!r}"
            )
        if not 0 <= self.test_percent < 100:
            raise ConfigError(
                f"{self.name} task: test_percent must be in 0..99, got {self.test_percent}"
            )

    def _read(self, path: str, split: str) -> list[Record]:
        source, rows = read_rows(path, split)
        return [
            to_record(obj, source, line, self.prompt_key, self.answer_key, self.answer_required)
            for obj, line in rows
        ]

    def _held_out_is_separate(self) -> bool:
        if self.eval_path is not None:
            return True
        splits = saved_splits(Path(self.path)) if Path(self.path).is_dir() else None
        return bool(splits) and any(s in splits for s in HELD_OUT_SPLITS)

    def records(self, split: str) -> list[Record]:
        if split not in ("train", "test"):
            raise ConfigError(f"split must be 'train' or 'test', got {split!r}")
        if split not in self._records:
            if self._held_out_is_separate():
                where = self.path if split == "train" else (self.eval_path or self.path)
                recs = self._read(where, split)
            else:
                recs = [
                    r
                    for r in self._read(self.path, "train")
                    if (zlib.crc32(r.problem.encode("utf-8", "replace")) % 100 < self.test_percent)
                    == (split == "test")
                ]
                if not recs:
                    raise InputFileError(self.path, f"no problems fall in the {split} split")
            self._records[split] = recs
        return self._records[split]

    def num_records(self, split: str) -> int:
        """Distinct problems in `split`: `problems()` asked for more goes round in epochs."""
        return len(self.records(split))

    def to_problem(self, r: Record, prompt_id: str, epoch: int = 0) -> Problem:
        meta: dict[str, Any] = {"source": r.source, "epoch": epoch, "columns": r.columns}
        if r.messages is not None:
            if self.prompt_template:
                raise ConfigError(
                    f"task.prompt_template: {r.source}: the prompt is a list of messages, "
                    "which the chat template renders; a template applies to text prompts only "
                    "(set task.prompt_template='' for these data)"
                )
            meta["messages"] = [dict(m) for m in r.messages]
            return Problem(prompt_id=prompt_id, prompt=r.problem, answer=r.answer, meta=meta)
        text = self.prompt_template.format(problem=r.problem) if self.prompt_template else r.problem
        return Problem(prompt_id=prompt_id, prompt=text, answer=r.answer, meta=meta)

    def problems(self, split: str, n: int, seed: int) -> list[Problem]:
        recs = self.records(split)
        rng = random.Random(f"{self.name}/{split}/{seed}")
        out: list[Problem] = []
        epoch = 0
        while len(out) < n:
            order = list(range(len(recs)))
            rng.shuffle(order)
            for j in order[: n - len(out)]:
                pid = f"{self.name}/{split}/{seed}/{len(out)}"
                out.append(self.to_problem(recs[j], pid, epoch))
            epoch += 1
        return out

    def score(self, problem: Problem, response: str) -> Score:
        return score_answer(problem, response, self.answer_from_last_line)

    def warmup(self) -> None:
        warmup()

    def __getstate__(self) -> dict[str, Any]:
        # Workers only score: do not ship the loaded records to them.
        state = dict(self.__dict__)
        state["_records"] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            object.__setattr__(self, k, v)
