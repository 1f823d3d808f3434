"""Answer checking for math and your own data: the final answer extracted from a response
and compared with the reference by math-verify.

The answer is the content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in the response,
or failing that the text after the last "answer is" / "Answer:"; it is compared with the
reference by math-verify (:func:`score_response`: reward ``1.0`` when equivalent, ``0.0``
otherwise; ``format_ok`` is False when no answer could be extracted). math-verify is imported
on first use and called with its own signal-based timeouts disabled (they only work in a main
thread): the hard time limit is the reward sandbox's (:class:`sortedrl.tasks.rewards.RewardRunner`).
"""

from __future__ import annotations

import re
from typing import Any

from sortedrl.errors import ConfigError
from sortedrl.tasks.base import Problem, Score

REWARD_CORRECT = 1.0
REWARD_WRONG = 0.0

MAX_ANSWER_CHARS = 1000  # an extracted answer longer than this is scored wrong, not parsed
MAX_RESPONSE_CHARS = 200_000


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
