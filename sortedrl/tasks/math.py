"""Math problems from local files, answers checked with math-verify.

The math task is the dataset task (:mod:`sortedrl.tasks.dataset`: formats, keys, splits,
epochs) with a prompt asking for a ``\\boxed{}`` answer. Input files (read by
:func:`load_math_file`): JSON Lines, a JSON array, Parquet, or a directory saved with
``datasets``. Each record needs the problem text under ``problem`` or ``question`` and the
reference answer under ``answer``, or else a ``solution`` whose last ``\\boxed{...}`` is the
answer. Keys are matched case-insensitively (``Problem``/``Answer`` as in some AIME dumps
work); a numeric answer is turned into text. A bad record stops loading with an
:class:`~sortedrl.errors.InputFileError` naming the file, the line (record number for JSON
arrays, Parquet and saved datasets) and the field.

Evaluation sets are files the user downloads once; nothing here touches the network.
:func:`load_eval_set` reads them by path. Where to get them (export the split to JSON Lines,
e.g. ``datasets.load_dataset(...)["test"].to_json("math500.jsonl")``):

* ``math500``: HuggingFace dataset ``HuggingFaceH4/MATH-500`` (split ``test``; fields
  ``problem``, ``answer``);
* ``aime24``: ``AI-MO/aimo-validation-aime`` (90 AIME 22-24 problems; keep the 2024 ones by
  their ``url``) or ``Maxwell-Jia/AIME_2024`` (split ``train``; fields ``Problem``, ``Answer``);
* ``minerva``: ``math-ai/minervamath`` (split ``test``; fields ``question``, ``answer``).

Scoring is the dataset task's, with the answer checking of :mod:`sortedrl.tasks.answers`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sortedrl.errors import ConfigError
from sortedrl.tasks.base import Problem
from sortedrl.tasks.data import read_rows
from sortedrl.tasks.dataset import DatasetTask, Record, to_record

PROMPT_TEMPLATE = (
    "{problem}\nPlease reason step by step, and put your final answer within \\boxed{{}}."
)

EVAL_SETS = {
    "math500": "HuggingFaceH4/MATH-500 (split 'test')",
    "aime24": "AI-MO/aimo-validation-aime (2024 rows) or Maxwell-Jia/AIME_2024",
    "minerva": "math-ai/minervamath (split 'test')",
}


# ---------------------------------------------------------------------------- loading

MathRecord = Record  # a math problem's record (prompt text, answer, source)


def load_math_file(path: str | Path) -> list[MathRecord]:
    """All records of a math data file (see :mod:`sortedrl.tasks.data` for the formats); raises
    InputFileError on any bad record."""
    source, rows = read_rows(path)
    return [to_record(obj, source, line) for obj, line in rows]


def load_eval_set(name: str, path: str | Path) -> list[Problem]:
    """A named evaluation set (``math500``, ``aime24``, ``minerva``) from a local file.

    See the module docstring for where to download each; the name only labels the problems.
    """
    if name not in EVAL_SETS:
        raise ConfigError(f"unknown eval set {name!r}; known: {', '.join(EVAL_SETS)}")
    task = MathTask(path=str(path))
    records = load_math_file(path)
    return [task.to_problem(r, f"{name}/{i}") for i, r in enumerate(records)]


# ---------------------------------------------------------------------------- the task


@dataclass(frozen=True)
class MathTask(DatasetTask):
    """Math problems from `path` (train) and `eval_path` (test): the dataset task with the
    step-by-step ``\\boxed{}`` instruction as its prompt template (see
    :class:`~sortedrl.tasks.dataset.DatasetTask` for splits, epochs and keys)."""

    prompt_template: str = PROMPT_TEMPLATE
    name: str = "math"

    answer_from_last_line = False  # the prompt asks for \boxed{}: an unmarked answer is none
