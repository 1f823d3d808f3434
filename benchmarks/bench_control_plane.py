"""The replica pool's control plane at scale: many light replicas, one driver.

Each replica is a Ray actor with a fraction of a CPU that runs a stepping engine whose step
takes a fixed time (`--step-ms`, a sleep), with response lengths drawn from the long-tailed
default spec (`sortedrl.workload.default_lengths_spec`) at `--cap`. The driver keeps every
slot supplied (a request for each slot that frees), as the run loop does, until
`--completions-per-replica` x replicas responses have come back (or `--max-seconds`).

Two protocols in the same run, each on fresh actors:

- `per_step`: one Ray call per engine step, the replica idle while the driver turns it around
  (the pool before replicas ran by themselves);
- `free`: the replicas step by themselves and the driver hears completions, and a heartbeat
  every `--report-s` from a replica with nothing finished; with `--backlog` N each replica
  also holds N requests beyond its slots and starts them itself as slots free up.

Printed for each replica count and protocol: the driver's CPU seconds per thousand
completions (`time.process_time` of this process, Ray's threads in it included), Ray calls
per completion (each a request and its reply), the pool's bubble from the replicas' clocks
against the same engines run in one process with instant refills (the bubble the engines
have on their own), and whether the driver keeps up: the pool's bubble within `--keep-up`
points of the in-process one. The ratios compare the two protocols of the same run. Example
(a few minutes on 2 CPU cores):

    python benchmarks/bench_control_plane.py --replicas 4,16,64
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sortedrl.cluster.config import ClusterConfig  # noqa: E402
from sortedrl.cluster.replica_actor import EngineReplica  # noqa: E402
from sortedrl.cluster.replicas import ReplicaPool  # noqa: E402
from sortedrl.cluster.runtime import start_ray, stop_ray  # noqa: E402
from sortedrl.scheduling.protocol import EngineBase, Generation, Request, StepReport  # noqa: E402
from sortedrl.workload import default_lengths_spec, parse_lengths_spec  # noqa: E402

GROUP = 8


class FixedStepEngine(EngineBase):
    """One token per running sequence per step, `capacity` slots, lengths from `spec`."""

    def __init__(self, capacity: int, spec: str, cap: int, seed: int) -> None:
        self.capacity, self.version = capacity, 0
        self._dist, self._seed = parse_lengths_spec(spec, cap), seed
        self._waiting: list[Request] = []
        self._running: dict[str, list] = {}  # request id -> [target, tokens so far]

    def length(self, req: Request) -> int:
        return self._dist.draw_group(self._seed, req.prompt_id, GROUP)[req.sample_index]

    def submit(self, requests) -> None:
        self._waiting.extend(requests)

    def num_unfinished(self) -> int:
        return len(self._waiting) + len(self._running)

    def step(self) -> StepReport:
        while self._waiting and len(self._running) < self.capacity:
            r = self._waiting.pop(0)
            self._running[r.request_id] = [min(self.length(r), r.max_new_tokens), 0]
        n = len(self._running)
        done = []
        for rid, entry in list(self._running.items()):
            entry[1] += 1
            if entry[1] >= entry[0]:
                del self._running[rid]
                done.append(Generation(rid, "stop", entry[1], [(self.version, entry[1])]))
        return StepReport(done, 1.0, float(n), n, 0)

    def abort(self, request_ids) -> list[Generation]:
        wanted = set(request_ids)
        out = [Generation(r, "abort", e[1], [(0, e[1])]) for r, e in self._running.items()]
        out = [g for g in out if g.request_id in wanted]
        out += [
            Generation(q.request_id, "abort", 0, [])
            for q in self._waiting
            if q.request_id in wanted
        ]
        self._running = {r: e for r, e in self._running.items() if r not in wanted}
        self._waiting = [q for q in self._waiting if q.request_id not in wanted]
        return out

    def pause(self) -> list[Generation]:
        return self.abort(list(self._running) + [q.request_id for q in self._waiting])

    def load_weights(self, weights, version: int) -> float:
        self.version = version
        return 0.0


class TimedReplica(EngineReplica):
    """A replica whose engine step sleeps `step_s`; busy slot-time in wall seconds."""

    def __init__(self, capacity: int, spec: str, cap: int, step_s: float, seed: int) -> None:
        self._setup(FixedStepEngine(capacity, spec, cap, seed), None, None, None)
        self.step_s = step_s

    def _engine_step(self) -> StepReport:
        t0 = time.perf_counter()
        time.sleep(self.step_s)
        report = self.engine.step()
        dt = time.perf_counter() - t0
        report.elapsed_s, report.busy_slot_s = dt, report.busy_slot_s * dt
        return report


def requests(cap: int, tag: str) -> Iterator[Request]:
    for i in itertools.count():
        yield Request(f"{tag}{i}", f"p{i // GROUP}", i % GROUP, 0, 16, cap)


def in_process_bubble(n: int, capacity: int, spec: str, cap: int, completions: int) -> float:
    """The same engines in one process, lockstep, every free slot refilled at once."""
    engines = [FixedStepEngine(capacity, spec, cap, seed=0) for _ in range(n)]
    source = requests(cap, "local")
    busy = steps = done = 0
    while done < completions:
        for e in engines:
            e.submit([next(source) for _ in range(e.capacity - e.num_unfinished())])
            report = e.step()
            busy += report.busy_slot_s
            done += len(report.finished)
        steps += 1
    return 1.0 - busy / (n * capacity * steps)


def drive(pool: ReplicaPool, cap: int, completions: int, max_s: float, tag: str) -> dict:
    source = requests(cap, tag)
    done, elapsed, busy = 0, 0.0, 0.0
    polls0 = pool.polls + pool.settles
    cpu0, t0 = time.process_time(), time.perf_counter()
    while done < completions and time.perf_counter() - t0 < max_s:
        free = pool.capacity + pool.submit_ahead - pool.num_unfinished()
        if free > 0:
            pool.submit([next(source) for _ in range(free)])
        report = pool.step()
        done += len(report.finished)
        elapsed += report.elapsed_s
        busy += report.busy_slot_s
    report = pool.settle()
    done += len(report.finished)
    elapsed += report.elapsed_s
    busy += report.busy_slot_s
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - t0
    calls = pool.polls + pool.settles - polls0
    return {
        "completions": done,
        "wall_s": wall,
        "cpu_per_1k": 1000 * cpu / max(done, 1),
        "calls_per_completion": calls / max(done, 1),
        "bubble": 1.0 - busy / (pool.capacity * elapsed) if elapsed > 0 else float("nan"),
        "per_s": done / wall,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--replicas", default="4,16,64", help="comma-separated replica counts")
    ap.add_argument("--capacity", type=int, default=8, help="slots per replica")
    ap.add_argument("--step-ms", type=float, default=5.0, help="one engine step, milliseconds")
    ap.add_argument("--cap", type=int, default=512, help="response length cap (tokens)")
    ap.add_argument("--completions-per-replica", type=int, default=30)
    ap.add_argument("--max-seconds", type=float, default=60.0, help="per protocol and count")
    ap.add_argument("--report-s", type=float, default=0.1, help="heartbeat of the free protocol")
    ap.add_argument("--replica-cpus", type=float, default=0.05)
    ap.add_argument("--backlog", type=int, default=0, help="requests per replica beyond its "
                    "slots in the free protocol (cluster.replica_backlog)")  # fmt: skip
    ap.add_argument("--keep-up", type=float, default=0.05, help="bubble points allowed")
    args = ap.parse_args()
    import ray

    counts = [int(x) for x in args.replicas.split(",")]
    spec = default_lengths_spec(args.cap)
    started = start_ray(
        ClusterConfig(backend="ray"), num_cpus=max(4, int(max(counts) * args.replica_cpus) + 1)
    )
    actor = ray.remote(max_concurrency=2)(TimedReplica)
    print(f"spec {spec}, cap {args.cap}, {args.capacity} slots x {args.step_ms} ms steps")
    header = f"{'replicas':>8} {'protocol':>8} {'done':>6} {'wall s':>7} {'/s':>7} {'cpu s/1k':>9} {'calls/c':>8} {'bubble':>7} {'local':>7} {'keeps up':>8}"
    print(header)
    rows = []
    try:
        for n in counts:
            total = args.completions_per_replica * n
            local = in_process_bubble(n, args.capacity, spec, args.cap, total)
            res = {}
            for proto in ("per_step", "free"):  # fresh actors for each: a pool numbers its polls
                actors = [
                    actor.options(num_cpus=args.replica_cpus).remote(
                        args.capacity, spec, args.cap, args.step_ms / 1000, 0
                    )
                    for _ in range(n)
                ]
                ray.get([a.capacity.remote() for a in actors])
                pool = ReplicaPool(
                    lambda i, a=actors: a[i],
                    n,
                    0,
                    report_s=args.report_s,
                    per_step=proto == "per_step",
                    backlog=args.backlog if proto == "free" else 0,
                )
                r = drive(pool, args.cap, total, args.max_seconds, f"{proto}{n}-")
                pool.close()
                r["keeps_up"] = r["completions"] >= total and r["bubble"] <= local + args.keep_up
                res[proto] = r
                print(
                    f"{n:>8} {proto:>8} {r['completions']:>6} {r['wall_s']:>7.1f} {r['per_s']:>7.1f} "
                    f"{r['cpu_per_1k']:>9.2f} {r['calls_per_completion']:>8.2f} {r['bubble']:>7.3f} "
                    f"{local:>7.3f} {'yes' if r['keeps_up'] else 'no':>8}",
                    flush=True,
                )
            old, new = res["per_step"], res["free"]
            print(
                f"{n:>8}    ratio  free/per_step: cpu per completion {new['cpu_per_1k'] / old['cpu_per_1k']:.3f}, "
                f"calls per completion {new['calls_per_completion'] / old['calls_per_completion']:.3f}, "
                f"completions/s {new['per_s'] / old['per_s']:.2f}",
                flush=True,
            )
            rows.append((n, res))
        for proto in ("per_step", "free"):
            ok = [n for n, res in rows if res[proto]["keeps_up"]]
            print(
                f"largest replica count the driver keeps up with ({proto}): {max(ok) if ok else 'none'}"
            )
    finally:
        stop_ray(started)


if __name__ == "__main__":
    main()
