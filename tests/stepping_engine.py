"""A minimal engine for controller tests: one token per sequence per unit of time.

Response lengths come from a function of (prompt_id, sample_index, attempt) (and the epoch,
with `by_epoch`), so tests can script exactly when each response finishes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from sortedrl.scheduling.protocol import (
    EngineBase,
    Generation,
    Request,
    StepReport,
    UpdateBatch,
    UpdateResult,
)


class SteppingEngine(EngineBase):
    def __init__(self, capacity: int, length: Callable[..., int], by_epoch: bool = False) -> None:
        self._capacity = capacity
        self._length = length  # (prompt_id, sample_index, attempt[, epoch]) -> length
        self._by_epoch = by_epoch
        self._version = 0
        self._waiting: list[Request] = []
        # request_id -> [request, target, tokens so far, spans]
        self._running: dict[str, list[Any]] = {}

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def version(self) -> int:
        return self._version

    def submit(self, requests: Sequence[Request]) -> None:
        self._waiting.extend(requests)

    def num_unfinished(self) -> int:
        return len(self._waiting) + len(self._running)

    def _start(self) -> None:
        while self._waiting and len(self._running) < self._capacity:
            r = self._waiting.pop(0)
            key = (r.prompt_id, r.sample_index, r.attempt) + ((r.epoch,) if self._by_epoch else ())
            target = min(self._length(*key), r.max_new_tokens)
            n = r.resume.n_tokens if r.resume else 0
            spans = [list(x) for x in r.resume.version_spans] if r.resume else []
            self._running[r.request_id] = [r, target, n, spans]

    def step(self) -> StepReport:
        self._start()
        active = len(self._running)
        finished = []
        for rid, entry in list(self._running.items()):
            _, target, n, spans = entry
            if n < target:
                n += 1
                if spans and spans[-1][0] == self._version:
                    spans[-1][1] += 1
                else:
                    spans.append([self._version, 1])
                entry[2] = n
            if n >= target:
                del self._running[rid]
                reason = "length" if n >= entry[0].max_new_tokens else "stop"
                finished.append(Generation(rid, reason, n, [tuple(x) for x in spans]))
        return StepReport(finished, 1.0, float(active), active, 0)

    def _partial(self, rid: str) -> Generation:
        _, _, n, spans = self._running.pop(rid)
        return Generation(rid, "abort", n, [tuple(x) for x in spans])

    def abort(self, request_ids: Sequence[str]) -> list[Generation]:
        out = []
        for rid in request_ids:
            if rid in self._running:
                out.append(self._partial(rid))
            else:
                for r in list(self._waiting):
                    if r.request_id == rid:
                        self._waiting.remove(r)
                        res = r.resume
                        spans = list(res.version_spans) if res else []
                        out.append(Generation(rid, "abort", res.n_tokens if res else 0, spans))
        return out

    def pause(self) -> list[Generation]:
        return self.abort([r.request_id for r in self._waiting] + list(self._running))

    def load_weights(self, weights: Any, version: int) -> float:
        self._version = version
        return 0.5


class UnitTrainer:
    virtual_time = True

    def __init__(self, seconds: float = 2.0) -> None:
        self.seconds = seconds
        self.batches: list[UpdateBatch] = []

    def update(self, batch: UpdateBatch) -> UpdateResult:
        self.batches.append(batch)
        return UpdateResult(elapsed_s=self.seconds)
