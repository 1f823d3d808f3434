"""Time of a replica pool whose replicas run by themselves (pure Python, no Ray).

Each replica delivers periods of its own clock, mapped to the driver's: `[start, end]` with
the busy slot-time its engine reported for the steps in it. The engine saw that time, so the
round trip to the driver is not idle slot time. A period reaches the driver after it ended,
and by then the pool may have reported time past its start (another replica delivered
first). Counting its busy time where it arrives could report more busy time than
`capacity x elapsed`, and the run's clock refuses that (`OvercountedBusyTime`).

So the pool reports time up to a horizon: the earliest point from which a replica may still
deliver busy time (where its next period starts), or now when no replica is working. Each
period's busy time is spread evenly over it and each report takes the part in its span. A
period is placed no earlier than the time already reported and after the replica's previous
period, and is never shorter than `busy / capacity` of its replica (a mapping error of a
replica's clock only shifts it), so every report keeps `busy <= capacity x elapsed`, and
once no replica is working the reported totals equal the replicas' totals exactly. Time while
no replica is working (an update, a weight sync) is not generating time: the accounting
restarts at the next poll.
"""

from __future__ import annotations


class PoolClock:
    def __init__(self, capacities: list[int]) -> None:
        self.capacities = list(capacities)
        self.t_reported: float | None = None  # reported up to here; None: none working
        # replica -> [start, end, busy per second] periods not yet fully reported
        self._spans: dict[int, list[list[float]]] = {}
        self._last_end: dict[int, float] = {}  # replica -> end of its last placed period

    def launched(self, t: float) -> None:
        """A poll was sent at `t` (driver time)."""
        if self.t_reported is None:
            self.t_reported = t

    def delivered(self, replica: int, start: float, end: float, busy_slot_s: float) -> float:
        """Replica `replica`'s period `[start, end]` (driver time); returns where it was
        placed to end (the replica's next period is placed after it)."""
        reported = start if self.t_reported is None else self.t_reported
        floor = max(reported, self._last_end.get(replica, start))
        s = max(start, floor)
        length = max(end - start, busy_slot_s / self.capacities[replica], 0.0)
        e = s + length
        self._last_end[replica] = e
        if busy_slot_s > 0 and length > 0:
            self._spans.setdefault(replica, []).append([s, e, busy_slot_s / length])
        return e

    def next_floor(self, replica: int, start: float) -> float:
        """Where replica `replica`'s next period, starting at `start`, will be placed."""
        return max(start, self._last_end.get(replica, start))

    def report(self, horizon: float | None, now: float) -> tuple[float, float]:
        """(elapsed, busy) from the last report to `horizon`, or, when no replica is working
        (`horizon` None), to the end of everything delivered (`now` at the earliest)."""
        if self.t_reported is None:
            return 0.0, 0.0
        t0 = self.t_reported
        if horizon is None:
            ends = [s[1] for spans in self._spans.values() for s in spans]
            t1 = max([t0, now, *ends])
        else:
            t1 = max(t0, min(horizon, now))
        busy = 0.0
        for spans in self._spans.values():
            for span in spans:
                start, end, rate = span
                a, b = max(start, t0), min(end, t1)
                if b > a:
                    busy += rate * (b - a)
            spans[:] = [s for s in spans if s[1] > t1]
        if horizon is None:
            self._spans.clear()
            self.t_reported = None
        else:
            self.t_reported = t1
        return t1 - t0, busy
