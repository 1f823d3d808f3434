"""Math problems from local files, answers checked with math-verify.

Input files (read by :func:`load_math_file`):

* JSON Lines (``.jsonl``, ``.jsonl.gz`` is not supported): one object per line;
* a JSON array of objects (``.json``);
* Parquet (``.parquet``), read with pyarrow when it is installed.

Each record needs the problem text under ``problem`` or ``question`` and the reference answer
under ``answer``, or else a ``solution`` whose last ``\\boxed{...}`` is the answer. Keys are
matched case-insensitively (``Problem``/``Answer`` as in some AIME dumps work); a numeric
answer is turned into text. Blank lines are skipped. A bad record stops loading with an
:class:`~sortedrl.errors.InputFileError` naming the file, the line (record number for JSON
arrays and Parquet) and the field.

Evaluation sets are files the user downloads once; nothing here touches the network.
:func:`load_eval_set` reads them by path. Where to get them (export the split to JSON Lines,
e.g. ``datasets.load_dataset(...)["test"].to_json("math500.jsonl")``):

* ``math500``: HuggingFace dataset ``HuggingFaceH4/MATH-500`` (split ``test``; fields
  ``problem``, ``answer``);
* ``aime24``: ``AI-MO/aimo-validation-aime`` (90 AIME 22-24 problems; keep the 2024 ones by
  their ``url``) or ``Maxwell-Jia/AIME_2024`` (split ``train``; fields ``Problem``, ``Answer``);
* ``minerva``: ``math-ai/minervamath`` (split ``test``; fields ``question``, ``answer``).

Scoring (:func:`score_response`): the answer is the content of the last ``\\boxed{...}`` (or
``\\fbox{...}``) in the response, or failing that the text after the last "answer is" /
"Answer:"; it is compared with the reference by math-verify. Reward ``1.0`` when equivalent,
``0.0`` otherwise; ``format_ok`` is False when no answer could be extracted. math-verify is
called with its own signal-based timeouts disabled (they only work in a main thread): the
hard time limit is the reward sandbox's (:class:`sortedrl.tasks.rewards.RewardRunner`).
"""

from __future__ import annotations

import json
import math
import random
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sortedrl.errors import ConfigError, InputFileError
from sortedrl.tasks.base import Problem, Score

REWARD_CORRECT = 1.0
REWARD_WRONG = 0.0

PROMPT_TEMPLATE = (
    "{problem}\nPlease reason step by step, and put your final answer within \\boxed{{}}."
)

EVAL_SETS = {
    "math500": "HuggingFaceH4/MATH-500 (split 'test')",
    "aime24": "AI-MO/aimo-validation-aime (2024 rows) or Maxwell-Jia/AIME_2024",
    "minerva": "math-ai/minervamath (split 'test')",
}

MAX_ANSWER_CHARS = 1000  # an extracted answer longer than this is scored wrong, not parsed
MAX_RESPONSE_CHARS = 200_000

_PROBLEM_KEYS = ("problem", "question")


# ---------------------------------------------------------------------------- answer extraction


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` (braces balanced), else None.

    A single linear scan from the last occurrence; never backtracks, so hostile input (deep
    nesting, unbalanced braces, megabytes) costs at most one pass.
    """
    best = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if best < 0:
        return None
    i = text.find("{", best)
    if i < 0:
        # "\boxed 5" (no braces): take the next token.
        rest = text[best + len("\\boxed") :].strip()
        if text.startswith("\\fbox", best):
            rest = text[best + len("\\fbox") :].strip()
        tok = rest.split("$")[0].split()
        return tok[0] if tok else None
    if text[best:i].strip() not in ("\\boxed", "\\fbox"):
        return None
    depth = 0
    for j in range(i, len(text)):
        c = text[j]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None


_ANSWER_IS_RE = re.compile(r"(?:answer is|answer:)", re.I)


def extract_answer(response: str) -> str | None:
    """The model's final answer: last boxed expression, else what follows the last 'answer is'."""
    boxed = last_boxed(response)
    if boxed is not None:
        return boxed.strip() or None
    last = None
    for m in _ANSWER_IS_RE.finditer(response):
        last = m
    if last is None:
        return None
    tail = response[last.end() :].strip().split("\n")[0].strip()
    tail = tail.strip("$ ").rstrip(".").strip("$ ")
    return tail or None


# ---------------------------------------------------------------------------- verification

_MV: Any = None


def _math_verify() -> Any:
    """Import math-verify once per process, with its signal-based timeout warning silenced."""
    global _MV
    if _MV is None:
        try:
            import math_verify
            import math_verify.grader
            import math_verify.parser
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ConfigError(
                "the math task needs math-verify: pip install 'math-verify[antlr4_13_2]'"
            ) from e
        # We disable its timeouts on purpose (the sandbox enforces them); skip the warning.
        math_verify.parser.TIMEOUT_WARNING_SHOWN = True
        math_verify.grader.TIMEOUT_WARNING_SHOWN = True
        _MV = math_verify
    return _MV


def _parse(mv: Any, expr: str) -> list[Any]:
    return mv.parse(
        f"${expr}$" if "$" not in expr else expr,
        extraction_config=[mv.LatexExtractionConfig(), mv.ExprExtractionConfig()],
        parsing_timeout=None,
    )


def answers_match(reference: str, predicted: str) -> bool:
    """Whether `predicted` is mathematically equivalent to `reference` (math-verify)."""
    if len(predicted) > MAX_ANSWER_CHARS:
        return False
    if predicted.strip() == reference.strip():
        return True
    mv = _math_verify()
    gold = _parse(mv, reference)
    pred = _parse(mv, predicted)
    if not gold or not pred:
        return False
    return bool(mv.verify(gold, pred, timeout_seconds=None))


def score_response(problem: Problem, response: str) -> Score:
    """1 when the extracted final answer matches the reference, else 0 (module-level)."""
    if not isinstance(response, str) or len(response) > MAX_RESPONSE_CHARS:
        return Score(REWARD_WRONG, False, False)
    pred = extract_answer(response)
    if pred is None:
        return Score(REWARD_WRONG, False, False)
    correct = answers_match(problem.answer, pred)
    return Score(REWARD_CORRECT if correct else REWARD_WRONG, correct, True)


def warmup() -> None:
    """Import math-verify and exercise it once (the sandbox calls this before timing calls)."""
    answers_match("\\frac{1}{2}", "0.5")


# ---------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class MathRecord:
    problem: str
    answer: str
    source: str  # "path:line" for messages and ids


def _field(obj: dict[str, Any], names: tuple[str, ...]) -> tuple[str, Any] | None:
    lowered = {k.lower(): k for k in obj if isinstance(k, str)}
    for name in names:
        if name in lowered:
            key = lowered[name]
            return key, obj[key]
    return None


def _record(obj: Any, path: str, line: int | None) -> MathRecord:
    if not isinstance(obj, dict):
        raise InputFileError(path, f"expected a JSON object, got {type(obj).__name__}", line=line)
    found = _field(obj, _PROBLEM_KEYS)
    if found is None:
        raise InputFileError(path, "missing (need 'problem' or 'question')", line, "problem")
    key, problem = found
    if not isinstance(problem, str):
        raise InputFileError(path, f"must be a string, got {type(problem).__name__}", line, key)
    if not problem.strip():
        raise InputFileError(path, "is empty", line, key)
    ans = _field(obj, ("answer",))
    if ans is not None:
        key, answer = ans
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
            raise InputFileError(
                path, f"must be a string or a number, got {type(answer).__name__}", line, key
            )
        if isinstance(answer, float) and not math.isfinite(answer):
            raise InputFileError(path, f"must be a finite number, got {answer}", line, key)
        answer = str(answer).strip()
        if not answer:
            raise InputFileError(path, "is empty", line, key)
    else:
        sol = _field(obj, ("solution",))
        if sol is None:
            raise InputFileError(
                path, "missing (need 'answer', or a 'solution' with \\boxed{})", line, "answer"
            )
        key, solution = sol
        if not isinstance(solution, str):
            raise InputFileError(
                path, f"must be a string, got {type(solution).__name__}", line, key
            )
        boxed = last_boxed(solution)
        if boxed is None or not boxed.strip():
            raise InputFileError(path, "has no \\boxed{...} answer", line, key)
        answer = boxed.strip()
    where = f"{path}:{line}" if line is not None else path
    return MathRecord(problem=problem, answer=answer, source=where)


def _json_problem(e: Exception) -> str:
    """What json.loads rejected beyond syntax: deep nesting, an integer too long to convert."""
    if isinstance(e, RecursionError):
        return "invalid JSON: nested too deeply"
    return f"invalid JSON: {str(e)[:200]}"


def _load_jsonl(path: Path) -> list[MathRecord]:
    data = path.read_bytes()
    records = []
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InputFileError(
                str(path), f"not valid UTF-8 ({e.reason} at byte {e.start})", lineno
            ) from None
        if lineno == 1:
            text = text.removeprefix("\ufeff")
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputFileError(
                str(path), f"invalid JSON: {e.msg} (column {e.colno})", lineno
            ) from None
        except (ValueError, RecursionError) as e:
            raise InputFileError(str(path), _json_problem(e), lineno) from None
        records.append(_record(obj, str(path), lineno))
    return records


def _load_json_array(path: Path) -> list[MathRecord]:
    try:
        text = path.read_bytes().decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        raise InputFileError(str(path), f"not valid UTF-8 ({e.reason} at byte {e.start})") from None
    if not text.strip():
        return []
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputFileError(
            str(path), f"invalid JSON: {e.msg} (column {e.colno})", e.lineno
        ) from None
    except (ValueError, RecursionError) as e:
        raise InputFileError(str(path), _json_problem(e)) from None
    if not isinstance(obj, list):
        raise InputFileError(str(path), "expected a JSON array of objects (or use .jsonl)")
    return [_record(o, str(path), i) for i, o in enumerate(obj, start=1)]


def _load_parquet(path: Path) -> list[MathRecord]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InputFileError(
            str(path), "reading Parquet needs pyarrow (pip install pyarrow), or convert to .jsonl"
        ) from None
    try:
        rows = pq.read_table(str(path)).to_pylist()
    except Exception as e:
        raise InputFileError(str(path), f"cannot read Parquet: {e}") from None
    return [_record(o, str(path), i) for i, o in enumerate(rows, start=1)]


def load_math_file(path: str | Path) -> list[MathRecord]:
    """All records of a JSONL / JSON / Parquet file; raises InputFileError on any bad record."""
    p = Path(path)
    if p.is_dir():
        raise InputFileError(str(p), "is a directory, not a data file")
    if not p.is_file():
        raise InputFileError(str(p), "no such file")
    suffix = p.suffix.lower()
    if suffix == ".parquet":
        records = _load_parquet(p)
    elif suffix == ".json":
        records = _load_json_array(p)
    else:
        records = _load_jsonl(p)
    if not records:
        raise InputFileError(str(p), "is empty (no records)")
    return records


def load_eval_set(name: str, path: str | Path) -> list[Problem]:
    """A named evaluation set (``math500``, ``aime24``, ``minerva``) from a local file.

    See the module docstring for where to download each; the name only labels the problems.
    """
    if name not in EVAL_SETS:
        raise ConfigError(f"unknown eval set {name!r}; known: {', '.join(EVAL_SETS)}")
    records = load_math_file(path)
    return [_to_problem(r, f"{name}/{i}", PROMPT_TEMPLATE) for i, r in enumerate(records)]


def _to_problem(r: MathRecord, prompt_id: str, template: str) -> Problem:
    return Problem(
        prompt_id=prompt_id,
        prompt=template.format(problem=r.problem),
        answer=r.answer,
        meta={"source": r.source},
    )


# ---------------------------------------------------------------------------- the task


@dataclass(frozen=True)
class MathTask:
    """Math problems from `path` (train) and `test_path` (test).

    Without `test_path`, the records of `path` are split by a hash of the problem text
    (`test_percent` of them go to test), so the splits are disjoint and stable. `problems`
    shuffles with `seed` and cycles through the split when more problems are asked for than
    it holds. `prompt_template` must contain ``{problem}``.
    """

    path: str
    test_path: str | None = None
    test_percent: int = 10
    prompt_template: str = PROMPT_TEMPLATE
    name: str = "math"
    _records: dict[str, list[MathRecord]] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if "{problem}" not in self.prompt_template:
            raise ConfigError("math task: prompt_template must contain '{problem}'")
        if not 0 <= self.test_percent < 100:
            raise ConfigError(f"math task: test_percent must be in 0..99, got {self.test_percent}")

    def records(self, split: str) -> list[MathRecord]:
        if split not in ("train", "test"):
            raise ConfigError(f"split must be 'train' or 'test', got {split!r}")
        if split not in self._records:
            if self.test_path is not None:
                recs = load_math_file(self.path if split == "train" else self.test_path)
            else:
                recs = [
                    r
                    for r in load_math_file(self.path)
                    if (zlib.crc32(r.problem.encode("utf-8", "replace")) % 100 < self.test_percent)
                    == (split == "test")
                ]
                if not recs:
                    raise InputFileError(self.path, f"no problems fall in the {split} split")
            self._records[split] = recs
        return self._records[split]

    def problems(self, split: str, n: int, seed: int) -> list[Problem]:
        recs = self.records(split)
        rng = random.Random(f"math/{split}/{seed}")
        out: list[Problem] = []
        while len(out) < n:
            order = list(range(len(recs)))
            rng.shuffle(order)
            for j in order[: n - len(out)]:
                out.append(
                    _to_problem(recs[j], f"math/{split}/{seed}/{len(out)}", self.prompt_template)
                )
        return out

    def score(self, problem: Problem, response: str) -> Score:
        return score_response(problem, response)

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
