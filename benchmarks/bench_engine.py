"""Continuous batching vs static batches on a long-tailed workload.

Runs the same requests (random prompts, response lengths forced by a per-request
`max_new_tokens` drawn from a lognormal, end-of-sequence ignored) on the same untrained tiny
model through

1. `TransformersEngine` (continuous batching, `capacity` sequences at most), and
2. `model.generate` with static batches of `capacity` requests taken in order, each batch
   running to its longest request (what a synchronous rollout without continuous batching
   does); only each request's own tokens count as generated,

3. `VLLMEngine` (vLLM V1's continuous batching and paged attention, in-process; only where
   vLLM is installed, `--no-vllm` to leave it out; its start-up is not timed),

and optionally 4. transformers' own continuous batching manager (`--compare-hf-cb`).
Every engine returns each token's log-prob (the rollout needs them). It prints generated
tokens/s of each and the ratios. Example (a few minutes on 2 CPU cores):

    python benchmarks/bench_engine.py --requests 128 --capacity 32 --size small

Threads: torch's intra-op threads are set with `--threads` (default 1). On a small shared CPU
one thread is faster and far steadier for a model this size than the default.
"""

from __future__ import annotations

import argparse
import logging
import math
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from sortedrl.engines.transformers_engine import TransformersEngine  # noqa: E402
from sortedrl.models.tiny import build_char_tokenizer, build_tiny_model, num_parameters  # noqa: E402
from sortedrl.scheduling.protocol import Request  # noqa: E402

ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz +-*=:?\n.,"


def make_workload(args) -> tuple[list[list[int]], list[int]]:
    rng = random.Random(args.seed)
    vocab = len(ALPHABET) + 4
    prompts, lengths = [], []
    for _ in range(args.requests):
        n = rng.randint(args.min_prompt, args.max_prompt)
        prompts.append([1] + [rng.randrange(4, vocab) for _ in range(n - 1)])
        draw = rng.lognormvariate(math.log(args.median_len), args.sigma)
        lengths.append(max(args.min_len, min(args.max_len, int(draw))))
    return prompts, lengths


def run_engine(model, tok, prompts, lengths, args) -> tuple[float, int, float]:
    eng = TransformersEngine(
        model,
        tok,
        capacity=args.capacity,
        stop_token_ids=[],
        seed=args.seed,
        min_admit=args.min_admit,
    )
    reqs = [
        Request(f"r{i}", f"p{i}", 0, 0, len(p), n, p)
        for i, (p, n) in enumerate(zip(prompts, lengths, strict=True))
    ]
    t0 = time.perf_counter()
    eng.submit(reqs)
    tokens, busy, elapsed, finished = 0, 0.0, 0.0, 0
    while eng.num_unfinished():
        rep = eng.step()
        tokens += rep.tokens_generated
        busy += rep.busy_slot_s
        elapsed += rep.elapsed_s
        finished += len(rep.finished)
    wall = time.perf_counter() - t0
    assert finished == len(reqs) and tokens == sum(lengths), (finished, tokens)
    bubble = 1.0 - busy / (args.capacity * elapsed)
    return wall, tokens, bubble


def run_vllm(eng, prompts, lengths, args) -> tuple[float, int, float]:
    reqs = [
        Request(f"v{eng.stats['steps']}-{i}", f"p{i}", 0, 0, len(p), n, p)
        for i, (p, n) in enumerate(zip(prompts, lengths, strict=True))
    ]
    t0 = time.perf_counter()
    eng.submit(reqs)
    tokens, busy, elapsed, finished = 0, 0.0, 0.0, 0
    while eng.num_unfinished():
        rep = eng.step()
        tokens += rep.tokens_generated
        busy += rep.busy_slot_s
        elapsed += rep.elapsed_s
        finished += len(rep.finished)
    wall = time.perf_counter() - t0
    assert finished == len(reqs) and tokens == sum(lengths), (finished, tokens)
    return wall, tokens, 1.0 - busy / (args.capacity * elapsed)


def run_vllm_update(eng, model, prompts, lengths, args, reprefill: bool) -> float:
    """Seconds to finish the requests when new weights arrive after `--update-after` steps,
    continuing on the kept KV cache (`reprefill=False`) or re-prefilling (`True`)."""
    eng.reprefill_on_load = reprefill
    reqs = [
        Request(f"u{int(reprefill)}-{i}", f"p{i}", 0, 0, len(p), n, p)
        for i, (p, n) in enumerate(zip(prompts, lengths, strict=True))
    ]
    eng.submit(reqs)
    for _ in range(args.update_after):
        eng.step()
    t0 = time.perf_counter()
    eng.load_weights(model.state_dict(), eng.version + 1)
    while eng.num_unfinished():
        eng.step()
    eng.reprefill_on_load = False
    return time.perf_counter() - t0


def start_vllm(model, tok, args):
    from sortedrl.engines.vllm_engine import VLLMEngine, vllm_available

    if args.no_vllm or not vllm_available():
        return None
    return VLLMEngine(
        model,
        tok,
        capacity=args.capacity,
        stop_token_ids=[],
        seed=args.seed,
        max_model_len=args.max_prompt + args.max_len,
        kv_cache_gib=args.kv_cache_gib,
    )


def run_static(model, prompts, lengths, args) -> tuple[float, int]:
    from transformers import GenerationConfig

    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = None  # ignore eos, as the engine does
    torch.manual_seed(args.seed)
    useful = 0
    t0 = time.perf_counter()
    try:
        for b in range(0, len(prompts), args.capacity):
            ps, ns = prompts[b : b + args.capacity], lengths[b : b + args.capacity]
            width = max(len(p) for p in ps)
            ids = torch.zeros((len(ps), width), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for j, p in enumerate(ps):  # left padding
                ids[j, width - len(p) :] = torch.tensor(p)
                mask[j, width - len(p) :] = 1
            gc = GenerationConfig(
                do_sample=True, temperature=1.0, top_p=1.0, pad_token_id=0, max_new_tokens=max(ns)
            )
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gc)
            assert out.shape[1] == width + max(ns)
            useful += sum(ns)
    finally:
        model.generation_config.eos_token_id = saved
    return time.perf_counter() - t0, useful


def run_hf_cb(model, prompts, lengths, args) -> tuple[float, int]:
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    logging.getLogger("ContinuousBatchingLogger").setLevel(logging.CRITICAL)
    gc = GenerationConfig(
        do_sample=True,
        temperature=1.0,
        top_p=1.0,
        eos_token_id=-1,
        pad_token_id=0,
        max_new_tokens=1,
    )
    cbc = ContinuousBatchingConfig(max_requests_per_batch=args.capacity, return_logprobs=True)
    attn = model.config._attn_implementation
    t0 = time.perf_counter()
    mgr = model.init_continuous_batching(generation_config=gc, continuous_batching_config=cbc)
    mgr.start()
    try:
        for i, (p, n) in enumerate(zip(prompts, lengths, strict=True)):
            mgr.add_request(p, request_id=f"r{i}", max_new_tokens=n, eos_token_id=-1)
        done: dict[str, int] = {}
        while len(done) < len(prompts):
            r = mgr.get_result(timeout=5)
            if r is None and not mgr.is_running():
                raise RuntimeError("transformers' continuous batching manager stopped")
            if r is not None and r.is_finished():
                done[r.request_id] = len(r.generated_tokens)
        wall = time.perf_counter() - t0
    finally:
        mgr.stop(block=True)
        model.destroy_cached_continuous_batching_manager()
        model.set_attn_implementation(attn)
    return wall, sum(done.values())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--capacity", type=int, default=32)
    ap.add_argument("--median-len", type=float, default=40.0, help="median response length")
    ap.add_argument("--sigma", type=float, default=0.8, help="lognormal sigma of response lengths")
    ap.add_argument("--min-len", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=320)
    ap.add_argument("--min-prompt", type=int, default=10)
    ap.add_argument("--max-prompt", type=int, default=30)
    ap.add_argument("--size", default="default", help="tiny model size (micro, default, small)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--repeats", type=int, default=1, help="interleaved repeats; medians reported")
    ap.add_argument("--min-admit", type=int, default=1, help="TransformersEngine min_admit")
    ap.add_argument(
        "--compare-hf-cb", action="store_true", help="also time transformers' CB manager"
    )
    ap.add_argument("--no-vllm", action="store_true", help="leave the vLLM engine out")
    ap.add_argument("--kv-cache-gib", type=float, default=0.25, help="vLLM KV cache (GiB)")
    ap.add_argument(
        "--update-after", type=int, default=20, help="vLLM: steps before the weight update"
    )
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    tok = build_char_tokenizer(ALPHABET)
    model = build_tiny_model(len(tok), seed=args.seed, size=args.size)
    prompts, lengths = make_workload(args)
    srt = sorted(lengths)
    print(
        f"model {args.size} ({num_parameters(model) / 1e6:.2f}M params), threads {args.threads}, "
        f"{args.requests} requests, capacity {args.capacity}"
    )
    print(
        f"response lengths: min {srt[0]}, median {srt[len(srt) // 2]}, p90 {srt[int(0.9 * len(srt))]}, "
        f"max {srt[-1]}, total {sum(lengths)} tokens"
    )
    run_engine(model, tok, prompts[:4], lengths[:4], args)  # warm-up
    t0 = time.perf_counter()
    vllm = start_vllm(model, tok, args)
    if vllm is not None:
        print(
            f"vLLM started in {time.perf_counter() - t0:.1f} s (not timed below); KV cache "
            f"{vllm.kv_cache_tokens} tokens = {vllm.kv_cache_sequences} sequences of "
            f"{vllm.max_model_len}"
        )
        run_vllm(vllm, prompts[:4], lengths[:4], args)  # warm-up

    eng_tps, st_tps, cb_tps, bubbles, v_tps, v_bubbles = [], [], [], [], [], []
    for _ in range(args.repeats):
        wall, tokens, bubble = run_engine(model, tok, prompts, lengths, args)
        eng_tps.append(tokens / wall)
        bubbles.append(bubble)
        wall, tokens = run_static(model, prompts, lengths, args)
        st_tps.append(tokens / wall)
        if vllm is not None:
            wall, tokens, bubble = run_vllm(vllm, prompts, lengths, args)
            v_tps.append(tokens / wall)
            v_bubbles.append(bubble)
        if args.compare_hf_cb:
            wall, tokens = run_hf_cb(model, prompts, lengths, args)
            cb_tps.append(tokens / wall)

    e, s = statistics.median(eng_tps), statistics.median(st_tps)
    print(
        f"TransformersEngine (continuous batching): {e:8.0f} tokens/s  (bubble {statistics.median(bubbles):.2f})"
    )
    print(f"model.generate, static batches:          {s:8.0f} tokens/s")
    if cb_tps:
        c = statistics.median(cb_tps)
        print(f"transformers CB manager (paged|sdpa):    {c:8.0f} tokens/s")
        print(f"ratio engine / transformers CB manager: {e / c:.2f}x")
    if v_tps:
        v = statistics.median(v_tps)
        print(
            f"VLLMEngine (vLLM V1, in-process):        {v:8.0f} tokens/s  "
            f"(bubble {statistics.median(v_bubbles):.2f})"
        )
        print(
            f"ratio vLLM / TransformersEngine: {v / e:.2f}x, vLLM / static generate: {v / s:.2f}x"
        )
        # An update while `capacity` requests are half done: decode on vs re-prefill.
        first = slice(0, args.capacity)
        keep, redo = [], []
        for _ in range(args.repeats):
            keep.append(run_vllm_update(vllm, model, prompts[first], lengths[first], args, False))
            redo.append(run_vllm_update(vllm, model, prompts[first], lengths[first], args, True))
        k, r = statistics.median(keep), statistics.median(redo)
        print(
            f"vLLM, weights loaded after {args.update_after} steps of {args.capacity} requests: "
            f"finishing on the kept KV cache {k:.3f} s, re-prefilling {r:.3f} s ({r / k:.2f}x)"
        )
        vllm.close()
    print(f"ratio engine / static generate: {e / s:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
