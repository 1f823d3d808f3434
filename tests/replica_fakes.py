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

    def step(self, requests):
        running = min(self.engine.capacity, self.engine.num_unfinished() + len(requests))
        t0 = time.perf_counter()
        time.sleep(self.delay)
        report, unfinished, reward_s = super().step(requests)
        # Wall time, not the stepping engine's unit steps: what a real replica reports.
        report.elapsed_s = time.perf_counter() - t0
        report.busy_slot_s = running * report.elapsed_s
        return report, unfinished, reward_s
