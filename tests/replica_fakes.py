"""Replicas for the pool's Ray tests that start in milliseconds: an `EngineReplica` around the
stepping engine of the controller tests, each step taking `delay` seconds of wall time (so one
replica can be made slower than another). Importable by Ray workers as `tests.replica_fakes`."""

from __future__ import annotations

import time

from sortedrl.cluster.replica_actor import EngineReplica
from tests.stepping_engine import SteppingEngine


def fake_length(prompt_id: str, sample_index: int, attempt: int) -> int:
    return 3 + (int(prompt_id[1:]) * 5 + sample_index) % 7


class SteppingReplica(EngineReplica):
    def __init__(self, capacity: int, delay: float) -> None:
        self._setup(SteppingEngine(capacity, fake_length), None, None, None)
        self.delay = delay

    def _engine_step(self):
        t0 = time.perf_counter()
        time.sleep(self.delay)
        report = super()._engine_step()
        # Wall time, not the stepping engine's unit steps: what a real replica reports.
        running = report.busy_slot_s / report.elapsed_s
        report.elapsed_s = time.perf_counter() - t0
        report.busy_slot_s = running * report.elapsed_s
        return report


class LateDeliveryReplica(SteppingReplica):
    """Its first poll waits `late_s` before it delivers, while the engine goes on: finished
    generations sit in the replica, not yet delivered (a restart of it delivers at once)."""

    _first_poll_done = False

    def __init__(self, capacity: int, delay: float, late_s: float) -> None:
        super().__init__(capacity, delay)
        self.late_s = late_s

    def poll(self, requests, wait_s, max_steps=None, number=0):
        fresh = self._hand_over(requests, max_steps, number)
        if not self._first_poll_done:
            self._first_poll_done = True
            time.sleep(self.late_s)
            fresh = False  # it delivers what finished meanwhile, not its first step
        return self._deliver_when_ready(wait_s, fresh)
