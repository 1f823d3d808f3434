"""Scale of the scheduling core on the simulated engine.

1. A simulation of `--responses` responses (default one million) with the `sorted` policy at
   the paper's setting; reports wall time (target: under a minute on one core).
2. Cost of one controller event against the number of sequences in flight: the same number of
   responses with engine capacity 1k, 4k, 16k, 64k; reports microseconds per event, the
   increase per 4x, and the ratio to the smallest capacity. For comparison it prints beside
   it what a logarithmic cost (log(C)/log(C_min)) and a linear one (C/C_min) would give; the
   measured growth is neither, only a few microseconds per 4x.

Run: python benchmarks/bench_simulator.py [--responses 1000000]
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import replace

from sortedrl.engines.costmodel import get_preset
from sortedrl.engines.simulated import SimulatedEngine
from sortedrl.engines.simulated_trainer import CostModelTrainer
from sortedrl.scheduling.config import SchedulerConfig
from sortedrl.scheduling.controller import Controller
from sortedrl.scheduling.loop import run
from sortedrl.scheduling.state import PromptSpec
from sortedrl.workload import Workload, default_lengths_spec


def simulate(
    responses: int, capacity_per_replica: int | None, rollout_batch: int, update_batch: int
):
    spec = get_preset("llama3.1-8b-h100")
    if capacity_per_replica is not None:
        # Scale KV memory with capacity so the engine really holds that many sequences.
        # Memory is not what this measures: give the KV cache room for every sequence.
        big = replace(spec.accelerator, memory_bytes=1e13)
        spec = replace(
            spec,
            accelerator=big,
            max_num_seqs=capacity_per_replica,
            response_cap=2048,
        )
        lengths = "lognormal:median=300,sigma=0.8"
    else:
        lengths = default_lengths_spec(spec.response_cap)
    g = 8
    prompts = responses // g
    ids = [f"p{i}" for i in range(prompts)]
    workload = Workload.from_spec(lengths, spec.response_cap, g, ids, seed=0)
    cfg = SchedulerConfig(
        policy="sorted",
        cache="keep",
        max_staleness=2,
        group_size=g,
        rollout_batch=rollout_batch,
        update_batch=update_batch,
        max_new_tokens=spec.response_cap,
    )
    engine = SimulatedEngine(spec, workload)
    controller = Controller(cfg, [PromptSpec(p, spec.prompt_len) for p in ids])
    t0 = time.perf_counter()
    result = run(controller, engine, CostModelTrainer(spec))
    # An event: a request submitted (fresh, resumed or regenerated) and its result handled.
    events = controller.requests_submitted
    return time.perf_counter() - t0, result.summary, engine.capacity, events


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--responses", type=int, default=1_000_000)
    ap.add_argument("--scaling-responses", type=int, default=200_000)
    args = ap.parse_args()

    secs, s, cap, _ = simulate(args.responses, None, rollout_batch=320, update_batch=128)
    print(
        f"[scale] {args.responses} responses, sorted/keep, llama3.1-8b-h100 (capacity {cap}): "
        f"{secs:.1f} s wall on one core; {s['tokens_generated'] / 1e9:.2f}B tokens simulated, "
        f"{s['updates']} updates, bubble {s['bubble_ratio']:.3f}"
    )
    print(f"[scale] target < 60 s: {'PASS' if secs < 60 else 'FAIL'}")

    print("[events] cost per controller event (request submitted and its result handled)")
    base = None
    prev = 0.0
    # A cost a + b*log(C) would add the same amount per 4x capacity; a linear one would
    # multiply by 4 each time.
    for per_replica in (128, 512, 2048, 8192):
        cap_total = per_replica * 8
        groups = cap_total // 8
        secs, s, cap, events = simulate(
            args.scaling_responses,
            per_replica,
            rollout_batch=groups * 2,
            update_batch=max(1, groups // 2),
        )
        us = secs / events * 1e6
        step = f"+{us - prev:.1f} us over the previous capacity; " if prev else ""
        prev = us
        if base is None:
            base = (us, cap)
        ratio = us / base[0]
        log_ratio = math.log(cap) / math.log(base[1])
        print(
            f"[events] capacity {cap:6d}: {us:6.2f} us/event ({events} events); {step}ratio {ratio:.2f} "
            f"(log ratio {log_ratio:.2f}, linear ratio {cap / base[1]:.0f})"
        )


if __name__ == "__main__":
    main()
