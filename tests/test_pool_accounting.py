"""The replica pool's bookkeeping without Ray: its time (`PoolClock`) never reports more busy
slot-time than capacity x elapsed, whatever order the replicas' periods arrive in and however
their clocks are mapped, and sums to the replicas' totals; a replica's engine loop returns
every request once; responses scored in a replica are not scored again by the run."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sortedrl.cluster.pool_clock import PoolClock
from sortedrl.commands.run import Run
from sortedrl.scheduling.protocol import Generation, Request
from sortedrl.tasks.base import Problem, Score

# Per replica: its capacity and its periods, each (idle gap before it, duration, share of its
# slots busy, delivery lag after it ends).
replicas = st.lists(
    st.tuples(
        st.integers(1, 8),
        st.lists(
            st.tuples(
                st.sampled_from([0.0, 0.0, 0.3]),
                st.floats(0.01, 5.0),
                st.floats(0.0, 1.0),
                st.floats(0.0, 0.2),
            ),
            min_size=1,
            max_size=12,
        ),
    ),
    min_size=1,
    max_size=4,
)


@settings(max_examples=150, deadline=None)
@given(replicas, st.integers(1, 6), st.floats(0.0, 3.0), st.floats(-0.05, 0.05))
def test_pool_reports_never_overcount_busy_time_and_add_up(reps, settle_every, gap, skew):
    """Drive the clock as the pool does: replicas run periods back to back (or after an idle
    gap) by their own clock, mapped to the driver's with an error `skew` for the last replica;
    each period arrives some time after it ended, and the pool reports up to the earliest
    next period; now and then it settles (every replica delivers what it ran, a report, an
    update gap with nothing running)."""
    clock = PoolClock([c for c, _ in reps])
    capacity = sum(c for c, _ in reps)
    todo = [list(periods) for _, periods in reps]
    skews = [0.0] * (len(reps) - 1) + [skew]
    t_rep = [0.0] * len(reps)  # where each replica's next period may start (its clock)
    now, reports, total_busy, deliveries = 0.0, [], 0.0, 0
    clock.launched(0.0)

    def next_start(i: int) -> float:
        return t_rep[i] + todo[i][0][0] + skews[i]

    def deliver(i: int) -> float:
        nonlocal total_busy
        idle, duration, share, lag = todo[i].pop(0)
        start = t_rep[i] + idle
        busy = share * reps[i][0] * duration
        t_rep[i] = start + duration
        clock.delivered(i, start + skews[i], t_rep[i] + skews[i], busy)
        total_busy += busy
        return t_rep[i] + lag

    while any(todo):
        deliveries += 1
        if deliveries % settle_every == 0:  # settle: each replica delivers one more period
            ends = [deliver(i) for i in range(len(reps)) if todo[i]]
            now = max([now, *ends])
            reports.append(clock.report(None, now))
            now += gap
            t_rep = [now] * len(reps)
            clock.launched(now)
            continue
        i = min((j for j in range(len(reps)) if todo[j]), key=lambda j: t_rep[j] + todo[j][0][1])
        now = max(now, deliver(i))
        waiting = [clock.next_floor(j, next_start(j)) for j in range(len(reps)) if todo[j]]
        reports.append(clock.report(min(waiting) if waiting else None, now))
    reports.append(clock.report(None, now))
    for elapsed, busy in reports:
        assert elapsed >= 0 and busy <= capacity * elapsed * (1 + 1e-9) + 1e-12
    assert sum(b for _, b in reports) == pytest.approx(total_busy, rel=1e-9, abs=1e-9)


def test_a_period_that_arrives_after_its_start_was_reported_is_shifted_not_dropped():
    clock = PoolClock([2])
    clock.launched(0.0)
    assert clock.report(1.0, 1.0) == (1.0, 0.0)  # the driver reported up to 1.0 already
    clock.delivered(0, 0.5, 1.5, 2.0)  # busy at full capacity over [0.5, 1.5]
    elapsed, busy = clock.report(None, 1.5)
    assert elapsed == pytest.approx(1.0) and busy == pytest.approx(2.0)


class _CountingScorer:
    def __init__(self) -> None:
        self.items: list[tuple[Problem, str, list[int]]] = []

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


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_a_replica_returns_every_request_once_and_its_periods_never_overcount(seed):
    """The replica's engine loop without Ray: polls (free and one step at a time), settles
    racing a poll in flight, and pauses, in a random order. Every request comes back once,
    finished or paused; deliveries follow each other on the replica's clock, and none has
    more busy slot-time than capacity x its length."""
    import random
    import threading

    from tests.replica_fakes import SteppingReplica

    rng = random.Random(seed)
    capacity = 3
    rep = SteppingReplica(capacity, 0.0005)
    submitted, back, deliveries = 0, [], []
    try:
        for _ in range(60):
            held = submitted - len(back)
            reqs = [
                Request(f"r{submitted + i}", f"p{submitted + i}", 0, 0, 4, 12)
                for i in range(rng.randint(0, capacity - held))
            ]
            submitted += len(reqs)
            steps = 1 if rng.random() < 0.3 else None
            paused = []
            if rng.random() < 0.4:  # a settle while the poll waits
                out: list = []
                t = threading.Thread(
                    target=lambda o=out, q=reqs, k=steps: o.append(rep.poll(q, 0.002, k))
                )
                t.start()
                time.sleep(rng.random() * 0.002)
                last = rep.settle()
                t.join()
                new = sorted([out[0], last], key=lambda d: d.seq)
                if rng.random() < 0.3:
                    paused = rep.pause()
            else:
                new = [rep.poll(reqs, 0.002, steps)]
            deliveries += new
            back += [g.request_id for d in new for g in d.finished]
            back += [g.request_id for g in paused]
        deliveries.append(rep.settle())
        back += [g.request_id for g in deliveries[-1].finished] + [
            g.request_id for g in rep.pause()
        ]
    finally:
        rep.close()
    assert sorted(back) == sorted(f"r{i}" for i in range(submitted))
    for prev, d in zip(deliveries, deliveries[1:], strict=False):
        assert d.start >= prev.end - 1e-12
    for d in deliveries:
        assert d.busy_slot_s <= capacity * (d.end - d.start) * (1 + 1e-9) + 1e-12
