"""Time of a replica pool whose replicas step concurrently (pure Python, no Ray).

A replica's step is known only when the driver collects it, and by then the pool may already
have reported the time that step started in (another replica's step came back first). Counting
the step's busy slot-time where it is collected could report more busy time than
`capacity x elapsed` for that report, and the run's clock refuses that (`OvercountedBusyTime`).

So the pool reports time up to a horizon: the launch time of the oldest step still in flight
(or now, when none is). Up to there every replica's busy time is known: each collected step
is spread evenly over the span the driver saw it run (launch to collection), and each report
takes exactly the part that falls in its span. Every report then keeps
`busy <= capacity x elapsed` (a step's rate never exceeds its replica's capacity), and once the
pool is settled (nothing in flight) the reported totals equal the replicas' totals exactly.
Time while nothing is in flight (an update, a weight sync) is not generating time: the
accounting restarts at the next launch.
"""

from __future__ import annotations


class PoolClock:
    def __init__(self) -> None:
        self.t_reported: float | None = None  # reported up to here; None: nothing in flight
        # replica -> [start, end, busy per second] spans collected but not yet fully reported
        self._spans: dict[int, list[list[float]]] = {}

    def launched(self, t: float) -> None:
        """A step was launched at `t` (driver time)."""
        if self.t_reported is None:
            self.t_reported = t

    def collected(self, replica: int, start: float, end: float, busy_slot_s: float) -> None:
        """Replica `replica`'s step, launched at `start` and collected at `end`."""
        if busy_slot_s <= 0:
            return
        span = max(end - start, 1e-12)
        self._spans.setdefault(replica, []).append([start, end, busy_slot_s / span])

    def report(self, horizon: float | None, now: float) -> tuple[float, float]:
        """(elapsed, busy) from the last report to `horizon` (the oldest launch still in
        flight), or to `now` when nothing is in flight (`horizon` None)."""
        if self.t_reported is None:
            return 0.0, 0.0
        t0 = self.t_reported
        t1 = max(t0, now if horizon is None else horizon)
        busy = 0.0
        for spans in self._spans.values():
            for span in spans:
                start, end, rate = span
                a, b = max(start, t0), min(end, t1)
                if b > a:
                    busy += rate * (b - a)
            spans[:] = [s for s in spans if s[1] > t1]
        if horizon is None:
            # Nothing in flight: every span ended by `now`, and the next launch starts anew.
            self._spans.clear()
            self.t_reported = None
        else:
            self.t_reported = t1
        return t1 - t0, busy
