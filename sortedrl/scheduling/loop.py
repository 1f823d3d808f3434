"""The run loop: drives an engine and a trainer through the controller.

Colocated policies (sync, sorted, partial) take turns: generate until an update is due, pause
the engine, update, load the new weights, resume. `async` keeps generating while the trainer
works on its own devices; the new weights are loaded into the running engine when the update
ends. Time is the sum of what the engine and trainer report (virtual for the simulated ones).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sortedrl.errors import SortedRLError
from sortedrl.scheduling.controller import Controller
from sortedrl.scheduling.metrics import Clock, UpdateRecord, summarize
from sortedrl.scheduling.protocol import (
    Engine,
    Generation,
    StepReport,
    Trainer,
    UpdateBatch,
    UpdateResult,
)

# Scores finished generations, given each one's (prompt_id, sample_index); returns
# (rewards, seconds it took).
RewardHook = Callable[[Sequence[Generation], Sequence[tuple[str, int]]], tuple[list[float], float]]
# Called after every update with the record just made.
UpdateHook = Callable[[UpdateRecord, UpdateBatch, UpdateResult], None]


@dataclass
class RunResult:
    controller: Controller
    clock: Clock
    summary: dict[str, Any]
    engine: Engine  # the engine at the end (a restarted one if the first died)
    stopped: bool = False  # `should_stop` ended the run early
    engine_restarts: int = 0


class EngineFailedError(SortedRLError):
    """The engine kept failing after restarts."""


class _PendingUpdate:
    """An update running beside the engine (async): virtual, or a real one in a thread."""

    def __init__(self, trainer: Trainer, batch: UpdateBatch, start_t: float) -> None:
        self.batch = batch
        self.start_t = start_t
        self.result: UpdateResult | None = None
        self.error: BaseException | None = None
        self._thread: threading.Thread | None = None
        if trainer.virtual_time:
            self.result = trainer.update(batch)
        else:
            self._thread = threading.Thread(target=self._run, args=(trainer,), daemon=True)
            self._thread.start()

    def _run(self, trainer: Trainer) -> None:
        try:
            self.result = trainer.update(self.batch)
        except BaseException as e:  # re-raised in the loop's thread
            self.error = e

    def ready_at(self) -> float | None:
        """Run time at which it is done, if known."""
        if self._thread is not None:
            if self._thread.is_alive():
                return None
            if self.error is not None:
                raise self.error
        assert self.result is not None
        return self.start_t + self.result.elapsed_s

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()


def run(
    controller: Controller,
    engine: Engine,
    trainer: Trainer,
    *,
    scorer: RewardHook | None = None,
    on_update: UpdateHook | None = None,
    max_updates: int | None = None,
    should_stop: Callable[[], bool] | None = None,
    restart_engine: Callable[[], Engine] | None = None,
    max_engine_failures: int = 4,
    pause_for_update: bool = True,
    clock: Clock | None = None,
) -> RunResult:
    """Run until the controller has trained or dropped every prompt, `max_updates` updates
    are done, or `should_stop()` says so (checked before every engine step).

    An engine whose `step` raises is replaced by `restart_engine()` (its requests go back to
    the controller's queue); at the `max_engine_failures`-th failure in a row the run raises
    `EngineFailedError`, with the controller left consistent for a checkpoint.

    Colocated policies pause the engine for an update (freeing its KV cache for the trainer)
    and re-prefill the partial responses afterwards. With `pause_for_update=False` (memory to
    spare, e.g. on a CPU) the engine only stops stepping: its responses keep their KV cache and
    go on under the new weights, and those past the staleness limit are aborted.

    `clock`: the run's clock, when the caller reads it during the run (checkpoints).
    """
    clock = clock if clock is not None else Clock(engine.capacity)
    loop = _Loop(controller, engine, trainer, clock, scorer, on_update)
    loop.should_stop = should_stop or (lambda: False)
    loop.restart_engine, loop.max_engine_failures = restart_engine, max_engine_failures
    loop.pause_for_update = pause_for_update
    if controller.colocated:
        loop.run_colocated(max_updates)
    else:
        loop.run_async(max_updates)
    loop.settle_before_stop()
    engine = loop.engine
    remaining = engine.pause() if engine.num_unfinished() else []
    if remaining:
        controller.stop(remaining)
    in_prompts, in_tokens = controller.in_flight()
    summary = summarize(controller.ledger, clock, in_prompts, in_tokens)
    summary["engine_restarts"] = loop.restarts
    return RunResult(controller, clock, summary, engine, loop.stopped, loop.restarts)


class _Loop:
    def __init__(
        self,
        controller: Controller,
        engine: Engine,
        trainer: Trainer,
        clock: Clock,
        scorer: RewardHook | None,
        on_update: UpdateHook | None,
    ) -> None:
        self.ctl, self.engine, self.trainer, self.clock = controller, engine, trainer, clock
        self.scorer, self.on_update = scorer, on_update
        self.should_stop: Callable[[], bool] = lambda: False
        self.stopped = False
        self.restart_engine: Callable[[], Engine] | None = None
        self.max_engine_failures = 4
        self.restarts = 0
        self._failures_in_a_row = 0
        self.pause_for_update = True

    def _submit(self) -> None:
        free = self.engine.capacity - self.engine.num_unfinished()
        ahead = min(self.engine.submit_ahead, self.engine.submit_ahead + free)
        requests = self.ctl.requests_to_submit(max(0, free), max(0, ahead))
        if requests:
            self.engine.submit(requests)

    def _stop_now(self) -> bool:
        if self.should_stop():
            self.stopped = True
        return self.stopped

    def _engine_failed(self, error: Exception) -> None:
        self._failures_in_a_row += 1
        if self.restart_engine is None or self._failures_in_a_row >= self.max_engine_failures:
            self.ctl.requeue_running()
            raise EngineFailedError(
                f"the rollout engine failed {self._failures_in_a_row} time(s) in a row; "
                f"last error: {type(error).__name__}: {error}"
            ) from error
        self.ctl.requeue_running()
        self.engine = self.restart_engine()
        self.restarts += 1

    def _generate(self, advance: bool = True) -> float:
        """One engine step; returns its elapsed time."""
        return self._engine_report(self.engine.step, advance)

    def _settle(self) -> None:
        """An engine that keeps steps in flight between calls (`settle`, e.g. the Ray replica
        pool) finishes and reports them, so the controller decides on what is really done."""
        if self.engine.steps_in_flight:
            self._engine_report(self.engine.settle, True)

    def _engine_report(self, call: Callable[[], StepReport], advance: bool) -> float:
        """Run `call` (a step or a settle) and feed its report to the clock, the scorer and the
        controller; returns its elapsed time."""
        round_ = self.ctl.current_round()
        try:
            report = call()
        except Exception as e:  # the engine died: requeue its work, restart it
            self._engine_failed(e)
            return 0.0
        self._failures_in_a_row = 0
        self.clock.add_generation(report.elapsed_s, report.busy_slot_s, advance, round_)
        self.ctl.observe_step(
            report.tokens_generated, report.busy_slot_s, report.elapsed_s, self.engine.capacity
        )
        rewards = None
        if self.scorer is not None and report.finished:
            keys = [self.ctl.response_key(g.request_id) for g in report.finished]
            rewards, seconds = self.scorer(report.finished, keys)
            self.clock.add("reward", seconds)
        self.ctl.on_generations(report.finished, rewards)
        return report.elapsed_s

    def settle_before_stop(self) -> None:
        """The run ends: report the steps still in flight (a pause after it returns only
        unfinished requests). Without an update to wait for, nothing is lost."""
        if self.engine.num_unfinished():
            self._settle()

    def _stuck(self) -> RuntimeError:
        return RuntimeError(
            "scheduler stalled: nothing running, nothing queued and no update due "
            f"(open groups {self.ctl.open_groups}, version {self.ctl.version})"
        )

    def _finish_update(self, batch: UpdateBatch, result: UpdateResult) -> None:
        ctl, clock = self.ctl, self.clock
        self._settle()  # async: what finished during the update is in the buffer before it
        to_abort = ctl.on_update_done(skipped=result.skipped)
        if to_abort:
            ctl.on_aborted(self.engine.abort(to_abort))
        if not result.skipped:
            clock.add("weight_sync", self.engine.load_weights(result.weights, ctl.version))
        record = _record(len(ctl.ledger.updates) + 1, batch, result, clock)
        ctl.ledger.updates.append(record)
        if self.on_update is not None:
            self.on_update(record, batch, result)

    def run_colocated(self, max_updates: int | None) -> None:
        ctl, engine, clock = self.ctl, self.engine, self.clock
        while not ctl.done():
            if max_updates is not None and len(ctl.ledger.updates) >= max_updates:
                return
            if self._stop_now():
                return
            engine = self.engine  # may have been restarted
            if ctl.update_due():
                self._settle()
                if not ctl.update_due():  # what the settle reported changed the decision
                    continue
                engine = self.engine  # may have been restarted by the settle
                if engine.num_unfinished() and self.pause_for_update:
                    ctl.on_paused(engine.pause())
                batch = ctl.take_update_batch()
                result = self.trainer.update(batch)
                clock.add("update", result.elapsed_s)
                self._finish_update(batch, result)
                continue
            self._submit()
            if engine.num_unfinished() == 0:
                raise self._stuck()
            self._generate()

    def run_async(self, max_updates: int | None) -> None:
        ctl, engine, clock = self.ctl, self.engine, self.clock
        pending: _PendingUpdate | None = None
        while not (ctl.done() and pending is None):
            engine = self.engine  # may have been restarted
            if pending is not None:
                ready = pending.ready_at()
                if ready is not None and ready <= clock.t + 1e-12:
                    clock.overlapped["update"] += pending.result.elapsed_s  # type: ignore[union-attr]
                    self._finish_update(pending.batch, pending.result)  # type: ignore[arg-type]
                    pending = None
                    continue
            if max_updates is not None and len(ctl.ledger.updates) >= max_updates:
                if pending is not None:
                    pending.wait()
                    continue
                return
            if pending is None and self._stop_now():
                return
            if pending is None and ctl.update_due():
                pending = _PendingUpdate(self.trainer, ctl.take_update_batch(), clock.t)
                continue
            self._submit()
            if engine.num_unfinished():
                self._generate()
                continue
            # Nothing to generate: wait for the trainer.
            if pending is None:
                raise self._stuck()
            pending.wait()
            ready = pending.ready_at()
            assert ready is not None
            clock.add("idle", max(0.0, ready - clock.t))


def _record(step: int, batch: UpdateBatch, result: UpdateResult, clock: Clock) -> UpdateRecord:
    samples = [s for g in batch.groups for s in g.samples]
    tokens = sum(s.n_tokens for s in samples)
    stale_n = [(batch.version - v, n) for s in samples for v, n in s.version_spans]
    return UpdateRecord(
        step=step,
        policy_version=batch.version,
        groups=len(batch.groups),
        samples=len(samples),
        tokens=tokens,
        response_len_mean=tokens / len(samples) if samples else 0.0,
        max_staleness_trained=max((st for st, n in stale_n if n), default=0),
        mean_staleness_trained=sum(st * n for st, n in stale_n) / tokens if tokens else 0.0,
        time_s=clock.t,
        bubble_ratio=clock.interval_bubble(),
        reward_mean=sum(s.reward for s in samples) / len(samples) if samples else 0.0,
        skipped=result.skipped,
        stats=dict(result.stats),
    )
