"""The reward sandbox: scoring untrusted model output under time and size limits.

:class:`RewardRunner` scores a batch of ``(problem, response)`` pairs with a task's ``score``
method or any ``fn(problem, response) -> float | Score``:

* ``workers >= 1``: in that many worker processes (``spawn`` start method by default). Each
  call has a hard wall-clock limit ``timeout_s``; a call that overruns is answered with
  ``Score(0, False, False, error="timeout")``, its worker is killed (SIGKILL) and replaced, and
  the rest of the batch goes on in the other workers, so one slow answer holds up the batch
  by at most its own limit.
* ``workers == 0``: in the calling process (tests, trivially cheap tasks). Size limits and
  exception handling still apply; there is no time limit.

Responses longer than ``max_response_chars`` are scored 0 with error ``too_long`` without ever
reaching the scorer. A scorer that raises gives reward 0 with error ``"exception: <Type>:
<message>"``. Error kinds are counted in ``runner.errors`` (a Counter over ``timeout``,
``too_long``, ``exception``, ``worker_died``, ``bad_return``, ``bad_input``, and
``scorer_error`` for a Score whose scorer set an error of its own).

Per-call times: ``runner.last_durations`` holds, for each item of the last batch, the seconds
from handing it to the scorer to its answer (a timed-out call counts until it was given up;
0.0 for an item the size check answered; for a scorer made of parts, the sum of its parts'
calls), and ``runner.max_call_s`` the longest single call over the runner's life.

A scorer made of parts (``parts`` and ``combine``: your weighted reward functions, see
:mod:`sortedrl.tasks.user_rewards`) has each part called on its own, under its own time limit,
so one function that hangs or dies costs only its own share of the reward.

A task object may define ``warmup()``: each worker calls it once before taking work (e.g. to
import math-verify), so import time is never charged to a call's time limit.

User reward functions are resolved in :mod:`sortedrl.tasks.user_rewards`.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing as mp
import os
import pickle
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from multiprocessing.connection import Connection, wait
from typing import Any

from sortedrl.errors import ConfigError, SortedRLError
from sortedrl.tasks.base import Problem, Score

ERROR_KINDS = ("timeout", "too_long", "exception", "worker_died", "bad_return", "bad_input")

_MAX_ERROR_CHARS = 300
_START_TIMEOUT_S = 120.0  # a worker that is not ready by then counts as failed to start
_MAX_START_FAILURES = 3  # consecutive start failures before the runner gives up


class RewardWorkerError(SortedRLError):
    """Reward worker processes cannot be started (e.g. the scorer cannot be imported there)."""


# ---------------------------------------------------------------------------- scoring one item


def _to_score(value: Any) -> Score:
    """A scorer's return value as a Score; bad values become a `bad_return` error."""
    if isinstance(value, Score):
        r = value.reward
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r):
            return Score(0.0, False, False, error=f"bad_return: reward {r!r:.50}")
        err = value.error
        if err is not None and not isinstance(err, str):
            err = f"bad_return: error is {type(err).__name__}"
        return Score(float(r), bool(value.correct), bool(value.format_ok), err)
    if isinstance(value, (bool, int, float)):
        r = float(value)
        if not math.isfinite(r):
            return Score(0.0, False, False, error=f"bad_return: reward {r!r}")
        return Score(r, r > 0, True)
    return Score(
        0.0, False, False, error=f"bad_return: {type(value).__name__} is not a float or Score"
    )


def _call_scorer(
    scorer: Any,
    problem: Problem,
    response: str,
    token_ids: list[int] | None = None,
    part: int | None = None,
) -> Score:
    try:
        if part is not None:  # one part of a scorer made of parts: it answers with a Score
            return scorer.parts[part].score(problem, response, token_ids)
        fn = scorer.score if hasattr(scorer, "score") else scorer
        return _to_score(fn(problem, response))
    except BaseException as e:  # noqa: BLE001 - untrusted scorers may raise anything
        if isinstance(e, KeyboardInterrupt):
            raise
        try:
            text = str(e)
            msg = f"exception: {type(e).__name__}" + (f": {text}" if text else "")
        except BaseException:  # noqa: BLE001 - a hostile __str__
            msg = f"exception: {type(e).__name__}"
        return Score(0.0, False, False, error=msg[:_MAX_ERROR_CHARS])


def _token_ids(item: tuple[Any, ...]) -> list[int] | None:
    return [int(t) for t in item[2]] if len(item) > 2 and item[2] is not None else None


def error_kind(error: str | None) -> str | None:
    """The kind of an error string (the part before the first colon)."""
    return None if error is None else error.split(":", 1)[0]


# ---------------------------------------------------------------------------- worker process


def _watch_parent(ppid: int) -> None:
    while True:
        time.sleep(1.0)
        if os.getppid() != ppid:
            os._exit(1)


def _worker_main(conn: Connection, scorer_bytes: bytes, ppid: int, memory_mb: int | None) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when workers stop
    try:
        os.setpgid(0, 0)  # own process group: killing it also ends anything the scorer started
    except (AttributeError, OSError):
        pass
    threading.Thread(target=_watch_parent, args=(ppid,), daemon=True).start()
    if memory_mb:
        try:
            import resource

            limit = memory_mb * 1024 * 1024
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        except (ImportError, ValueError, OSError):
            pass
    scorer = pickle.loads(scorer_bytes)
    warm = getattr(scorer, "warmup", None)
    if callable(warm):
        try:
            warm()
        except Exception:  # noqa: BLE001 - scoring will report it
            pass
    conn.send(("ready", None))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        idx, problem, response, token_ids, part = msg
        conn.send((idx, _call_scorer(scorer, problem, response, token_ids, part)))


@contextlib.contextmanager
def _no_phantom_main() -> Iterator[None]:
    """Hide a `__main__.__file__` that is not a file (``python - <<EOF``, ``-c``) while spawning.

    The spawn start method re-runs the parent's main file in the child; when there is no such
    file the child dies before it starts. Our workers never need the parent's main module.
    """
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    hide = (
        main is not None
        and isinstance(path, str)
        and getattr(main, "__spec__", None) is None
        and not os.path.isfile(path)
    )
    if hide:
        del main.__file__
    try:
        yield
    finally:
        if hide:
            main.__file__ = path


class _Worker:
    def __init__(self, ctx: Any, scorer_bytes: bytes, memory_mb: int | None):
        parent, child = ctx.Pipe(duplex=True)
        self.conn: Connection = parent
        self.proc = ctx.Process(
            target=_worker_main,
            args=(child, scorer_bytes, os.getpid(), memory_mb),
            daemon=True,
            name="sortedrl-reward",
        )
        with _no_phantom_main():
            self.proc.start()
        child.close()
        self.started = time.monotonic()
        self.ready = False
        self.item: int | None = None  # index of the item being scored
        self.deadline = math.inf
        self.sent_at = 0.0  # when the item was sent (time.monotonic())
        self.killed = False

    def kill(self) -> None:
        """Kill the worker and its process group, then reap it (once)."""
        if self.killed:
            return
        self.killed = True
        pid = self.proc.pid
        # Only while the worker is not reaped: its pid (so its group id) cannot be reused yet.
        popen = getattr(self.proc, "_popen", None)
        if pid is not None and hasattr(os, "killpg") and getattr(popen, "returncode", 0) is None:
            try:
                os.killpg(pid, signal.SIGKILL)  # the group the worker made for itself, if any
            except OSError:
                pass
        try:
            self.proc.kill()
        except Exception:  # noqa: BLE001
            pass
        self.proc.join(timeout=5)
        try:
            self.conn.close()
        except Exception:  # noqa: BLE001
            pass


# ---------------------------------------------------------------------------- the runner


class RewardRunner:
    """Scores batches of responses with time and size limits; see the module docstring.

    `task_or_score_fn`: an object with a ``score(problem, response)`` method (a Task) or a
    callable ``fn(problem, response) -> float | Score``; it must be picklable (a module-level
    function or a plain task object) when ``workers >= 1``. A float ``r`` becomes
    ``Score(r, correct=r > 0, format_ok=True)``.

    `memory_mb` caps each worker's address space (Linux; None for no cap).
    """

    def __init__(
        self,
        task_or_score_fn: Any,
        timeout_s: float = 10.0,
        max_response_chars: int = 100_000,
        workers: int = 2,
        memory_mb: int | None = 4096,
        start_method: str = "spawn",
    ):
        if not (callable(task_or_score_fn) or callable(getattr(task_or_score_fn, "score", None))):
            raise ConfigError("reward: need a task with a score() method or a callable")
        if not timeout_s > 0:
            raise ConfigError(f"reward timeout_s must be > 0, got {timeout_s}")
        if max_response_chars < 0:
            raise ConfigError(f"reward max_response_chars must be >= 0, got {max_response_chars}")
        if workers < 0:
            raise ConfigError(f"reward workers must be >= 0, got {workers}")
        self.scorer = task_or_score_fn
        self.timeout_s = float(timeout_s)
        self.max_response_chars = int(max_response_chars)
        self.n_workers = int(workers)
        self.memory_mb = memory_mb
        self.errors: Counter[str] = Counter()
        self.calls = 0
        self.last_durations: list[float] = []  # seconds per item of the last batch
        self._durations: list[float] = []  # seconds per call of the batch being scored
        self.max_call_s = 0.0  # the longest single call so far
        self._lock = threading.Lock()
        self._workers: list[_Worker] = []
        self._closed = False
        self._start_failures = 0
        if self.n_workers > 0:
            try:
                self._scorer_bytes = pickle.dumps(task_or_score_fn)
            except Exception as e:
                raise ConfigError(
                    f"reward: the scorer cannot be sent to worker processes ({e}); use a "
                    "module-level function or task object, or workers=0"
                ) from None
            self._ctx = mp.get_context(start_method)
            self._workers = [self._spawn() for _ in range(self.n_workers)]

    # -- lifecycle

    def _spawn(self) -> _Worker:
        return _Worker(self._ctx, self._scorer_bytes, self.memory_mb)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for w in self._workers:
            try:
                if w.item is None:
                    w.conn.send(None)
            except Exception:  # noqa: BLE001
                pass
        end = time.monotonic() + 2.0
        for w in self._workers:
            w.proc.join(timeout=max(0.0, end - time.monotonic()))
            if w.proc.is_alive():
                w.kill()
            else:
                w.conn.close()
        self._workers = []

    def __enter__(self) -> RewardRunner:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass

    # -- scoring

    def _precheck(self, problem: Any, response: Any) -> Score | None:
        if not isinstance(response, str):
            return Score(
                0.0, False, False, error=f"bad_input: response is {type(response).__name__}"
            )
        if len(response) > self.max_response_chars:
            return Score(0.0, False, False, error="too_long")
        return None

    def score(self, problem: Problem, response: str) -> Score:
        return self.score_batch([(problem, response)])[0]

    def score_batch(self, items: Sequence[tuple[Any, ...]]) -> list[Score]:
        """One Score per item, in order. Returns within about `timeout_s` per call per worker.

        An item is ``(problem, response)`` or ``(problem, response, token_ids)`` (the response's
        token ids, for reward functions that ask for them). A scorer with ``parts`` and
        ``combine`` (your weighted reward functions) has each part called on its own, each
        under its own time limit, and its ``combine`` makes the item's Score of their answers.
        """
        if self._closed:
            raise RuntimeError("RewardRunner is closed")
        with self._lock:
            results: list[Score | None] = [None] * len(items)
            self.last_durations = [0.0] * len(items)
            parts = getattr(self.scorer, "parts", None) if hasattr(self.scorer, "combine") else None
            jobs: list[tuple[int, int | None]] = []  # (item, part)
            for i, item in enumerate(items):
                pre = self._precheck(item[0], item[1])
                if pre is not None:
                    results[i] = pre
                else:
                    jobs += [(i, k) for k in range(len(parts))] if parts else [(i, None)]
            payloads = [(items[i][0], items[i][1], _token_ids(items[i]), k) for i, k in jobs]
            answers: list[Score | None] = [None] * len(jobs)
            self._durations = [0.0] * len(jobs)
            if self.n_workers == 0:
                for j, payload in enumerate(payloads):
                    t0 = time.monotonic()
                    answers[j] = _call_scorer(self.scorer, *payload)
                    self._durations[j] = time.monotonic() - t0
            elif jobs:
                try:
                    self._run_in_workers(payloads, answers)
                except BaseException:
                    # Interrupted (e.g. KeyboardInterrupt): workers still busy with this batch
                    # must not answer the next one.
                    for w in list(self._workers):
                        if w.item is not None:
                            w.item = None
                            if not self._closed:
                                self._workers[self._workers.index(w)] = self._spawn()
                            w.kill()
                    raise
            for s in [*results, *answers]:
                kind = error_kind(s.error) if s is not None else None
                if kind is not None:
                    self.errors[kind if kind in ERROR_KINDS else "scorer_error"] += 1
            by_item: dict[int, list[Score]] = {}
            for (i, _), answer, t in zip(jobs, answers, self._durations, strict=True):
                assert answer is not None
                by_item.setdefault(i, []).append(answer)
                self.last_durations[i] += t
            for i, got in by_item.items():
                results[i] = self.scorer.combine(items[i][0], items[i][1], got) if parts else got[0]
            out: list[Score] = []
            for s in results:
                assert s is not None
                out.append(s)
            self.calls += len(items)
            self.max_call_s = max(self.max_call_s, *self._durations, 0.0)
            return out

    def _run_in_workers(self, payloads: list[tuple[Any, ...]], results: list[Score | None]) -> None:
        """Each payload (problem, response, token_ids, part) scored in a worker: `results`
        and `self._durations` are filled in, by payload index."""
        queue = list(reversed(range(len(payloads))))  # pop() takes the next one in order
        resent: set[int] = set()  # items sent to a worker that was found dead before scoring
        while queue or any(w.item is not None for w in self._workers):
            if not self._workers:  # pragma: no cover - _replace raises before this happens
                raise RewardWorkerError("no reward worker is left")
            # Dispatch to ready, idle workers.
            for w in list(self._workers):
                if not (queue and w.ready and w.item is None):
                    continue
                i = queue.pop()
                try:
                    w.conn.send((i, *payloads[i]))
                except (OSError, EOFError):  # the worker died while idle
                    if i in resent:
                        results[i] = Score(0.0, False, False, error="worker_died: on send")
                    else:
                        resent.add(i)
                        queue.append(i)
                    self._replace(w, failed_start=False)
                    continue
                except Exception as e:  # noqa: BLE001 - the item cannot be pickled
                    msg = f"bad_input: cannot send to worker: {type(e).__name__}: {e}"
                    results[i] = Score(0.0, False, False, error=msg[:_MAX_ERROR_CHARS])
                    continue
                w.sent_at = time.monotonic()
                w.item, w.deadline = i, w.sent_at + self.timeout_s
            # Wait for a result, a worker becoming ready, a death, or the next deadline.
            deadlines = [w.deadline for w in self._workers if w.item is not None]
            deadlines += [w.started + _START_TIMEOUT_S for w in self._workers if not w.ready]
            wait_s = min(deadlines, default=math.inf) - time.monotonic()
            handles: dict[Any, _Worker] = {}
            for w in self._workers:
                handles[w.conn] = w
                handles[w.proc.sentinel] = w
            ready_handles = wait(list(handles), timeout=min(max(wait_s, 0.0), 1.0))
            serviced: list[_Worker] = []
            for h in ready_handles:
                if not any(handles[h] is x for x in serviced):
                    serviced.append(handles[h])
            for w in serviced:
                self._service(w, results)
            # Enforce deadlines.
            now = time.monotonic()
            for w in list(self._workers):
                if w.item is not None and now >= w.deadline:
                    results[w.item] = Score(0.0, False, False, error="timeout")
                    self._durations[w.item] = now - w.sent_at
                    w.item = None
                    self._replace(w, failed_start=False)
                elif not w.ready and now >= w.started + _START_TIMEOUT_S:
                    self._replace(w, failed_start=True)

    def _service(self, w: _Worker, results: list[Score | None]) -> None:
        """Handle whatever made worker `w` wake us: a message, or its death."""
        msg: Any = None
        try:
            # Nothing to read means the wake-up came from the process sentinel: it exited.
            if w.conn.poll():
                msg = w.conn.recv()
        except Exception:  # noqa: BLE001 - EOF or a broken pipe: the worker died
            msg = None
        if msg is None:
            w.kill()
            if not w.ready:
                self._replace(w, failed_start=True)
                return
            i, w.item = w.item, None
            if i is not None:
                code = w.proc.exitcode
                results[i] = Score(0.0, False, False, error=f"worker_died: exit code {code}")
                self._durations[i] = time.monotonic() - w.sent_at
            self._replace(w, failed_start=False)
            return
        if msg[0] == "ready":
            w.ready = True
            self._start_failures = 0
            return
        idx, score = msg
        if idx == w.item:
            results[idx] = score if isinstance(score, Score) else _to_score(score)
            self._durations[idx] = time.monotonic() - w.sent_at
            w.item, w.deadline = None, math.inf

    def _replace(self, w: _Worker, failed_start: bool) -> None:
        w.kill()
        if failed_start:
            self._start_failures += 1
            if self._start_failures >= _MAX_START_FAILURES:
                self._workers.remove(w)
                if not any(x.ready for x in self._workers):
                    self._closed = True
                    for x in self._workers:
                        x.kill()
                    self._workers = []
                    raise RewardWorkerError(
                        "reward worker processes exit before they are ready (exit code "
                        f"{w.proc.exitcode}); check that the reward function or task can be "
                        "imported in a fresh Python process, or run with workers=0"
                    )
                return
        self._workers[self._workers.index(w)] = self._spawn()
