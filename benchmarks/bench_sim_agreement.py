"""Does the simulated engine predict the real one? The same recorded length trace, the same
scheduler, the bubble ratio of the transformers engine beside the simulated engine's.

1. Calibrate a cost model for the transformers engine on this machine: decode-step time
   `a + b * n` for `n` running sequences, and prefill time per token, fitted from timed steps.
2. Replay the trace (`trace.jsonl`, written by every `sortedrl train` run) through the
   controller on both engines: the transformers engine generates exactly the recorded number of
   tokens per response (stop tokens off, the length forced), the simulated engine takes the
   same lengths from the trace. Updates take no time in both (rollout is what is compared).
3. Print both bubble ratios per policy and their difference.

Run: python benchmarks/bench_sim_agreement.py --trace runs/train/trace.jsonl
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Sequence
from dataclasses import replace

import torch

from sortedrl.engines.costmodel import PRESETS, AcceleratorSpec, ClusterSpec, ModelSpec
from sortedrl.engines.simulated import SimulatedEngine
from sortedrl.engines.transformers_engine import TransformersEngine
from sortedrl.models.tiny import build_char_tokenizer, build_tiny_model, num_parameters
from sortedrl.scheduling.config import SchedulerConfig
from sortedrl.scheduling.controller import Controller
from sortedrl.scheduling.loop import run
from sortedrl.scheduling.protocol import Request, UpdateBatch, UpdateResult
from sortedrl.scheduling.state import PromptSpec
from sortedrl.tasks.reverse import ALPHABET
from sortedrl.workload import Workload

PROMPT_LEN = 8


class NoTimeTrainer:
    """Updates that take no time: only rollout is compared."""

    def __init__(self, virtual: bool) -> None:
        self.virtual_time = virtual

    def update(self, batch: UpdateBatch) -> UpdateResult:
        return UpdateResult(elapsed_s=0.0, weights=None)


class ForcedLengths:
    """The transformers engine, made to generate exactly the trace's length per response."""

    def __init__(self, engine: TransformersEngine, workload: Workload) -> None:
        self.engine, self.workload = engine, workload

    def __getattr__(self, name: str):
        return getattr(self.engine, name)

    @property
    def capacity(self) -> int:
        return self.engine.capacity

    @property
    def version(self) -> int:
        return self.engine.version

    def submit(self, requests: Sequence[Request]) -> None:
        forced = [
            replace(r, max_new_tokens=self.workload.length(r.prompt_id, r.sample_index, r.attempt))
            for r in requests
        ]
        self.engine.submit(forced)


def calibrate(model, tok, capacity: int) -> tuple[float, float, float]:
    """(a, b, p): decode step `a + b*n` seconds, prefill `p` seconds per prompt token."""
    rng = random.Random(0)
    xs, ys, pre = [], [], []
    sizes = sorted({min(capacity, 2**k) for k in range(capacity.bit_length())} | {capacity})
    for n in sizes:
        n = max(1, n)
        eng = TransformersEngine(model, tok, capacity=n, temperature=1.0, stop_token_ids=[])
        reqs = [
            Request(
                f"c{i}",
                f"c{i}",
                0,
                0,
                PROMPT_LEN,
                48,
                [1] + [rng.randrange(4, len(tok)) for _ in range(PROMPT_LEN - 1)],
            )
            for i in range(n)
        ]
        eng.submit(reqs)
        first = eng.step().elapsed_s  # prefill of all n, plus a decode step
        times = [eng.step().elapsed_s for _ in range(40)]
        times.sort()
        step = times[len(times) // 2]  # median: robust to a stray slow step
        xs.append(n)
        ys.append(step)
        pre.append(max(0.0, first - step) / (n * PROMPT_LEN))
        eng.pause()
    # Least squares over capacities spaced 2x apart, so the few-sequence tail (where the
    # bubble is decided) weighs as much as the full engine.
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mx) ** 2 for x in xs
    )
    a = my - b * mx
    for x, y in zip(xs, ys, strict=True):
        print(
            f"[calibration] {x:3d} sequences: {y * 1e3:.2f} ms/step (model {(a + b * x) * 1e3:.2f})"
        )
    # Prefill per token as a full batch of new requests pays it (how every batch starts).
    return max(a, 1e-6), max(b, 1e-9), pre[-1]


def calibrated_preset(params: float, a: float, b: float, p: float, capacity: int) -> ClusterSpec:
    flops = 1e12
    eff = 2.0 * params / (flops * b)  # decode compute per sequence = b seconds
    mfu = 2.0 * params / (flops * max(p, 1e-9))  # prefill per token = p seconds
    model = ModelSpec(
        "tiny-llama",
        params,
        layers=4,
        kv_heads=2,
        head_dim=32,
        q_heads=4,
        dtype_bytes=4,
        source="the embedded tiny model",
    )
    cpu = AcceleratorSpec(
        "this-cpu",
        memory_bytes=64e9,
        bandwidth_bytes_per_s=1e15,
        flops_per_s=flops,
        bandwidth_efficiency=1.0,
        decode_flops_efficiency=eff,
        prefill_mfu=mfu,
        source="fitted by bench_sim_agreement.py",
    )
    base = PRESETS["test-tiny"]
    return replace(
        base,
        name="calibrated-cpu",
        model=model,
        accelerator=cpu,
        gpus=1,
        tp=1,
        max_num_seqs=capacity,
        gpu_memory_utilization=1.0,
        reserve_bytes_per_gpu=0,
        prompt_len=PROMPT_LEN,
        response_cap=4096,
        step_overhead_s=a,
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trace", required=True)
    ap.add_argument("--capacity", type=int, default=64)
    ap.add_argument("--update-batch", type=int, default=8)
    ap.add_argument("--rollout-batch", type=int, default=32)
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--policies", default="sync,sorted,partial")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    tok = build_char_tokenizer(ALPHABET)
    model = build_tiny_model(len(tok), seed=0)
    a, b, p = calibrate(model, tok, args.capacity)
    print(
        f"[calibration] decode step {a * 1e3:.2f} ms + {b * 1e3:.3f} ms/sequence; "
        f"prefill {p * 1e6:.1f} us/token"
    )
    spec = calibrated_preset(num_parameters(model), a, b, p, args.capacity)
    workload = Workload.from_trace(args.trace, cap=4096)
    ids = workload.prompt_ids()[: args.prompts]
    rng = random.Random(1)
    prompts = [
        PromptSpec(
            pid, PROMPT_LEN, [1] + [rng.randrange(4, len(tok)) for _ in range(PROMPT_LEN - 1)]
        )
        for pid in ids
    ]
    print(f"[trace] {args.trace}: {len(ids)} prompts x {workload.group_size} responses")
    for policy in args.policies.split(","):
        cfg = SchedulerConfig.for_policy(
            policy,
            group_size=workload.group_size,
            rollout_batch=args.rollout_batch,
            update_batch=args.update_batch,
            max_staleness=2,
            max_new_tokens=4096,
        )
        real_engine = ForcedLengths(
            TransformersEngine(model, tok, capacity=args.capacity, stop_token_ids=[]), workload
        )
        t0 = time.perf_counter()
        real = run(Controller(cfg, prompts), real_engine, NoTimeTrainer(False)).summary
        wall = time.perf_counter() - t0
        sim = run(
            Controller(cfg, prompts), SimulatedEngine(spec, workload), NoTimeTrainer(True)
        ).summary
        print(
            f"[{policy}] bubble: transformers {real['bubble_ratio']:.3f}, simulated "
            f"{sim['bubble_ratio']:.3f} (difference {sim['bubble_ratio'] - real['bubble_ratio']:+.3f}); "
            f"rollout time: transformers {real['rollout_time_s']:.1f} s, simulated "
            f"{sim['rollout_time_s']:.1f} s; {wall:.0f} s wall"
        )


if __name__ == "__main__":
    main()
