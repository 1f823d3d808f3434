"""The hostile-output corpus through the math verifier in the reward sandbox.

Scores every entry of `tests/data/hostile_outputs.jsonl` (huge exponents, deep nesting,
megabyte answers, odd unicode, regex bombs, sympy traps, injection junk) against a simple
reference problem ("1 + 1", answer 2) as ONE batch through ``RewardRunner`` and prints the
corpus size, the count of each error kind, the slowest calls and the batch wall time.
Example (about half a minute on 2 CPU cores):

    python benchmarks/bench_hostile_rewards.py --timeout 2 --workers 2
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "data"))

from make_hostile_outputs import expand  # noqa: E402

from sortedrl.tasks.base import Problem  # noqa: E402
from sortedrl.tasks.math import MathTask  # noqa: E402
from sortedrl.tasks.rewards import RewardRunner, error_kind  # noqa: E402

CORPUS = ROOT / "tests" / "data" / "hostile_outputs.jsonl"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--timeout", type=float, default=2.0, help="hard limit per call (s)")
    ap.add_argument("--workers", type=int, default=2, help="reward worker processes")
    ap.add_argument("--max-chars", type=int, default=10_000_000, help="sandbox size limit (chars)")
    ap.add_argument("--top", type=int, default=5, help="show this many slowest calls")
    args = ap.parse_args(argv)

    with open(CORPUS, encoding="utf-8") as f:
        corpus = [json.loads(line) for line in f if line.strip()]
    problem = Problem("math/ref", "What is 1 + 1?", "2")
    items = [(problem, expand(e)) for e in corpus]
    n = len(items)

    t_start = time.monotonic()
    with RewardRunner(
        MathTask(path="unused.jsonl"),
        timeout_s=args.timeout,
        workers=args.workers,
        max_response_chars=args.max_chars,
    ) as runner:
        runner.score_batch([(problem, "\\boxed{2}")])  # start the workers (imports)
        startup = time.monotonic() - t_start
        t0 = time.monotonic()
        scores = runner.score_batch(items)
        wall = time.monotonic() - t0
        durations = list(runner.last_durations)

    kinds = Counter(error_kind(s.error) or "ok" for s in scores)
    by_corpus_kind: dict[str, Counter[str]] = {}
    for entry, s in zip(corpus, scores, strict=True):
        by_corpus_kind.setdefault(entry["kind"], Counter())[error_kind(s.error) or "ok"] += 1
    bound = args.timeout * math.ceil(n / max(args.workers, 1))

    print(f"corpus: {n} entries ({sum(len(r) for _, r in items):,} chars in all)")
    print(f"workers: {args.workers}, timeout per call: {args.timeout:.1f}s")
    print(f"worker start-up: {startup:.1f}s")
    print("results by error kind: " + ", ".join(f"{k}={v}" for k, v in sorted(kinds.items())))
    for ck, c in sorted(by_corpus_kind.items()):
        print(f"  {ck:20s} " + ", ".join(f"{k}={v}" for k, v in sorted(c.items())))
    answered = [d for d, s in zip(durations, scores, strict=True) if s.error is None]
    print(
        f"worst call: {max(durations):.2f}s; answered calls: median "
        f"{statistics.median(answered) if answered else 0.0:.3f}s, "
        f"max {max(answered, default=0.0):.3f}s"
    )
    order = sorted(range(n), key=lambda i: -durations[i])[: args.top]
    for i in order:
        print(
            f"  {durations[i]:6.2f}s  {corpus[i]['kind']:15s} "
            f"{scores[i].error or 'ok':8s} {items[i][1][:50]!r}"
        )
    print(f"batch wall time: {wall:.1f}s (timeout x ceil(n/workers) = {bound:.0f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
