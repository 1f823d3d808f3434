"""The replica pool's bookkeeping without Ray: its time (`PoolClock`) never reports more busy
slot-time than capacity x elapsed, whatever order concurrent steps come back in, and sums to
the replicas' totals; responses scored in a replica are not scored again by the run."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sortedrl.cluster.pool_clock import PoolClock
from sortedrl.commands.run import Run
from sortedrl.scheduling.protocol import Generation
from sortedrl.tasks.base import Problem, Score

# Per replica: its capacity and its steps, each (duration, share of its slots busy).
replicas = st.lists(
    st.tuples(
        st.integers(1, 8),
        st.lists(st.tuples(st.floats(0.01, 5.0), st.floats(0.0, 1.0)), min_size=1, max_size=12),
    ),
    min_size=1,
    max_size=4,
)


@settings(max_examples=150, deadline=None)
@given(replicas, st.integers(1, 5), st.floats(0.0, 3.0))
def test_pool_reports_never_overcount_busy_time_and_add_up(reps, settle_every, gap):
    """Drive the clock as the pool does: wait for the first step to end, collect every one
    ended by then, relaunch, report up to the oldest launch in flight; settle now and then
    (wait for all, report, an update gap with nothing running)."""
    clock = PoolClock()
    capacity = sum(c for c, _ in reps)
    todo = [list(steps) for _, steps in reps]
    flight: dict[int, tuple[float, float, float]] = {}  # replica -> (launch, end, busy)
    t, reports, total_busy, generating = 0.0, [], 0.0, 0.0

    def launch(i: int, at: float) -> None:
        duration, share = todo[i].pop(0)
        flight[i] = (at, at + duration, share * reps[i][0] * duration)
        clock.launched(at)

    def collect(i: int, at: float) -> None:
        nonlocal total_busy
        launched, _, busy = flight.pop(i)
        clock.collected(i, launched, at, busy)
        total_busy += busy

    for i in range(len(reps)):
        launch(i, t)
    start, calls = t, 0
    while flight:
        calls += 1
        if calls % settle_every == 0:  # settle, then an update with nothing running
            t = max(end for _, end, _ in flight.values())
            for i in list(flight):
                collect(i, t)
            reports.append(clock.report(None, t))
            generating += t - start
            t += gap
            start = t
            for i in range(len(reps)):
                if todo[i]:
                    launch(i, t)
            continue
        t = min(end for _, end, _ in flight.values())
        ended = [i for i, (_, end, _) in flight.items() if end <= t]
        for i in ended:
            collect(i, t)
        t += 0.001  # the driver's own work before relaunching
        for i in ended:
            if todo[i]:
                launch(i, t)
        horizon = min((a for a, _, _ in flight.values()), default=None)
        reports.append(clock.report(horizon, t))
        if horizon is None:
            generating += t - start
    for elapsed, busy in reports:
        assert elapsed >= 0 and busy <= capacity * elapsed * (1 + 1e-9) + 1e-12
    assert sum(b for _, b in reports) == pytest.approx(total_busy, rel=1e-9, abs=1e-9)
    assert sum(e for e, _ in reports) == pytest.approx(generating, rel=1e-9, abs=1e-9)


class _CountingScorer:
    def __init__(self) -> None:
        self.items: list[tuple[Problem, str]] = []

    def score_batch(self, items):
        self.items += items
        return [Score(0.25, False, True) for _ in items]


def test_the_run_does_not_score_again_what_a_replica_scored():
    problems = {p: Problem(p, "abc", "cba") for p in ("p0", "p1")}
    tok = SimpleNamespace(decode=lambda ids, skip_special_tokens: "x" * len(ids))
    scorer = _CountingScorer()
    run = SimpleNamespace(problems=SimpleNamespace(by_id=problems), tokenizer=tok, scorer=scorer)
    run.console = SimpleNamespace(show=lambda score, where: None)  # the reward-failure console
    run.scores = {}
    pre = Generation("r0", "stop", 2, [(0, 2)], [5, 6], [-0.1, -0.2], Score(1.0, True, True))
    new = Generation("r1", "stop", 3, [(0, 3)], [5, 6, 7], [-0.1, -0.2, -0.3])
    rewards, seconds = Run.score(run, [pre, new], [("p0", 0), ("p1", 1)])
    assert rewards == [1.0, 0.25]
    assert [(p.prompt_id, text) for p, text, _ in scorer.items] == [("p1", "xxx")]
    assert run.scores[("p0", 0)].correct and not run.scores[("p1", 1)].correct
    rewards, seconds = Run.score(run, [pre], [("p0", 0)])
    assert rewards == [1.0] and seconds == 0.0 and len(scorer.items) == 1
