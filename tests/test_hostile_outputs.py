"""Every task's verifier against a corpus of hostile model outputs, under the reward sandbox.

The corpus (`tests/data/hostile_outputs.jsonl`, made by `tests/data/make_hostile_outputs.py`)
holds huge exponents and factorials, 1k-50k-deep nesting, megabyte answers, lone surrogates,
NUL bytes, RTL and combining marks, regex-bomb-like strings, inputs that make sympy work hard,
and SQL/shell-looking junk. Each task scores all of it as ONE batch through
``RewardRunner(task, timeout_s=2.0, workers=2)``: every item must come back as a Score with a
finite reward in the task's range, no exception may escape, and the batch must finish within
the sandbox's bound (so one slow answer cannot hold up the rest).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import pytest

from sortedrl.tasks.base import Problem, Score
from sortedrl.tasks.knights_knaves import KnightsKnavesTask
from sortedrl.tasks.math import MathTask
from sortedrl.tasks.reverse import ReverseTask
from sortedrl.tasks.rewards import RewardRunner, error_kind

DATA = Path(__file__).parent / "data"
sys.path.insert(0, str(DATA))
from make_hostile_outputs import entries, expand  # noqa: E402

TIMEOUT_S = 2.0
WORKERS = 2
# Per item, on top of its time limit: pipe transfer of megabyte strings and re-spawning a
# killed worker (math re-imports sympy and math-verify) on a loaded 2-core machine.
SLACK_S = 2.0
MAX_CHARS = 10_000_000  # let megabyte answers reach the verifiers (they have their own caps)


def load_corpus() -> list[dict]:
    with open(DATA / "hostile_outputs.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


CORPUS = load_corpus()


def _math_task() -> tuple[MathTask, Problem]:
    # Scoring never reads the data file, so it need not exist.
    return MathTask(path="unused.jsonl"), Problem("math/ref", "What is 1 + 1?", "2")


def _kk_task() -> tuple[KnightsKnavesTask, Problem]:
    task = KnightsKnavesTask(min_people=2, max_people=2)
    return task, task.problems("train", 1, seed=0)[0]


def _reverse_task() -> tuple[ReverseTask, Problem]:
    task = ReverseTask()
    return task, task.problems("train", 1, seed=0)[0]


TASKS = {
    "math": (_math_task, (0.0, 1.0)),
    "knights_knaves": (_kk_task, (-1.0, 1.0)),
    "reverse": (_reverse_task, (0.0, 1.0)),
}


def test_corpus_is_checked_in_as_the_script_makes_it():
    assert len(CORPUS) >= 60
    assert CORPUS == json.loads(json.dumps(entries()))  # the file is what the script writes
    assert (DATA / "hostile_outputs.jsonl").stat().st_size < 200_000
    responses = [expand(e) for e in CORPUS]
    kinds = {e["kind"] for e in CORPUS}
    for kind in ("huge_exponent", "factorial", "nested_frac", "long", "unicode", "regex_bomb"):
        assert kind in kinds
    assert max(len(r) for r in responses) >= 1_000_000
    assert any("\ud800" in r for r in responses)  # lone surrogates survive the round trip
    assert any("\x00" in r for r in responses)


@pytest.mark.parametrize("name", list(TASKS))
def test_hostile_corpus_scores_within_limits(name):
    make, (lo, hi) = TASKS[name]
    task, problem = make()
    items = [(problem, expand(e)) for e in CORPUS]
    n = len(items)
    bound = (TIMEOUT_S + SLACK_S) * math.ceil(n / WORKERS)
    with RewardRunner(
        task, timeout_s=TIMEOUT_S, workers=WORKERS, max_response_chars=MAX_CHARS
    ) as runner:
        runner.score_batch([(problem, problem.answer)])  # start-up is not part of the limit
        t0 = time.monotonic()
        out = runner.score_batch(items)
        wall = time.monotonic() - t0
        durations = list(runner.last_durations)
        errors = dict(runner.errors)
    worst = max(range(n), key=lambda i: durations[i])
    print(
        f"\n[{name}] corpus={n} batch={wall:.1f}s (bound {bound:.0f}s) "
        f"worst call={durations[worst]:.2f}s ({CORPUS[worst]['kind']}) errors={errors}"
    )
    assert len(out) == n and len(durations) == n
    for entry, score in zip(CORPUS, out, strict=True):
        assert isinstance(score, Score), entry["kind"]
        assert math.isfinite(score.reward) and lo <= score.reward <= hi, (entry["kind"], score)
        # Only the sandbox's own limits may fire: a verifier that raised or died is a bug.
        assert error_kind(score.error) in (None, "timeout"), (entry["kind"], score.error)
    assert max(durations) < TIMEOUT_S + 1.0  # no call outlives its limit by much
    assert wall < bound  # generous: every call at its limit, workers fully serialised
    # The well-formed controls still score as the verifier says.
    assert out[0].reward == (1.0 if name == "math" else lo)
