"""The contract every rollout engine keeps, as a test class: a test module subclasses
`EngineContract` and provides the fixture `h` (a `Harness` around its engine).

`tests/test_engine_contract.py` runs it against every engine that can start here;
`tests/test_replica_pool.py` against a pool of Ray replicas.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from sortedrl.scheduling.protocol import Engine, Generation, Partial, Request

ALPHABET = "0123456789abcdefghij+-=:\n"
# Two heads of 32: vLLM's CPU attention has no head size 16 (the micro model's own).
HEADS = dict(num_attention_heads=2, num_key_value_heads=1)


@dataclass
class Harness:
    engine: Engine
    prompt: Callable[[int], list[int] | None]  # prompt token ids for request i (None: sim)
    forward_logprobs: Callable[[list[int], list[int]], list[float]] | None = None
    deterministic_resume: bool = True  # a paused+resumed response equals an uninterrupted one


def tiny_greedy(seed: int = 3) -> tuple[Any, Any]:
    """(tokenizer, model): the micro model with sharp distributions (greedy has no near-ties)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from sortedrl.models.tiny import build_char_tokenizer, build_tiny_model

    torch.set_num_threads(1)
    tok = build_char_tokenizer(ALPHABET)
    model = build_tiny_model(len(tok), seed=seed, size="micro")
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    return tok, model


def tiny_harness(engine: Engine, tok: Any, model: Any) -> Harness:
    """The harness of an engine serving `model` (greedy) with `tok`."""
    import torch

    def prompt(i: int) -> list[int]:
        rng = random.Random(i)
        return [1] + [rng.randrange(4, len(tok)) for _ in range(2 + i % 5)]

    @torch.no_grad()
    def forward_logprobs(prompt_ids: list[int], response: list[int]) -> list[float]:
        ids = torch.tensor([prompt_ids + response])
        logits = model(ids).logits[0, len(prompt_ids) - 1 : -1].float()
        lp = torch.log_softmax(logits, -1)
        return lp[torch.arange(len(response)), torch.tensor(response)].tolist()

    return Harness(engine, prompt, forward_logprobs)


def request(
    h: Harness, i: int, max_new: int, resume: Partial | None = None, rid: str = ""
) -> Request:
    ids = h.prompt(i)
    return Request(
        request_id=rid or f"r{i}",
        prompt_id=f"p{i}",
        sample_index=0,
        attempt=0,
        prompt_len=len(ids) if ids else 4,
        max_new_tokens=max_new,
        prompt_token_ids=ids,
        resume=resume,
    )


def drain(engine: Engine, limit: int = 10_000) -> tuple[list[Generation], list[Any]]:
    out, reports = [], []
    for _ in range(limit):
        if not engine.num_unfinished():
            return out, reports
        report = engine.step()
        reports.append(report)
        out.extend(report.finished)
    raise AssertionError("engine made no progress")


def check_generation(g: Generation, max_new: int) -> None:
    assert g.finish_reason in ("stop", "length")
    assert 0 < g.n_tokens <= max_new
    assert sum(n for _, n in g.version_spans) == g.n_tokens
    versions = [v for v, _ in g.version_spans]
    assert versions == sorted(versions)
    if g.token_ids is not None:
        assert len(g.token_ids) == g.n_tokens
        assert g.logprobs is not None and len(g.logprobs) == g.n_tokens


class EngineContract:
    """What every engine must do, whatever it runs on."""

    def test_every_request_comes_back_exactly_once_within_capacity(self, h):
        e = h.engine
        reqs = [request(h, i, max_new=12 + i % 9) for i in range(20)]
        e.submit(reqs)
        assert e.num_unfinished() == 20
        gens, reports = drain(e)
        assert sorted(g.request_id for g in gens) == sorted(r.request_id for r in reqs)
        by_id = {r.request_id: r for r in reqs}
        for g in gens:
            check_generation(g, by_id[g.request_id].max_new_tokens)
        for rep in reports:
            assert rep.busy_slot_s <= e.capacity * rep.elapsed_s * (1 + 1e-9) + 1e-12
        assert sum(r.tokens_generated for r in reports) == sum(g.n_tokens for g in gens)

    def test_max_new_tokens_is_a_hard_cap(self, h):
        e = h.engine
        e.submit([request(h, i, max_new=3) for i in range(5)])
        gens, _ = drain(e)
        assert all(g.n_tokens <= 3 for g in gens)

    def test_abort_returns_a_partial_and_the_request_never_comes_back(self, h):
        e = h.engine
        e.submit([request(h, i, max_new=40) for i in range(4)])
        early = e.step().finished + e.step().finished
        aborted = e.abort(["r1", "r3", "unknown"])
        assert not early
        assert sorted(g.request_id for g in aborted) == ["r1", "r3"]
        for g in aborted:
            assert g.finish_reason == "abort"
            assert sum(n for _, n in g.version_spans) == g.n_tokens
        gens, _ = drain(e)
        assert sorted(g.request_id for g in gens) == ["r0", "r2"]

    def test_pause_and_resume_continue_where_they_stopped(self, h):
        e = h.engine
        max_new = 30
        e.submit([request(h, i, max_new) for i in range(3)])
        straight, _ = drain(e)
        straight_by_prompt = {g.request_id: g for g in straight}

        e.submit([request(h, i, max_new, rid=f"a{i}") for i in range(3)])
        for _ in range(3):
            e.step()
        partials = e.pause()
        assert e.num_unfinished() == 0
        done_early = [g for g in partials if g.finish_reason != "abort"]
        assert not done_early
        resumed = [
            request(
                h, int(g.request_id[1:]), max_new, resume=g.as_partial(), rid=f"b{g.request_id[1:]}"
            )
            for g in partials
        ]
        e.submit(resumed)
        gens, _ = drain(e)
        for g in gens:
            first = straight_by_prompt[f"r{g.request_id[1:]}"]
            assert g.n_tokens == first.n_tokens
            if h.deterministic_resume and g.token_ids is not None:
                assert g.token_ids == first.token_ids

    def test_new_weights_version_later_tokens(self, h):
        e = h.engine
        e.submit([request(h, 0, max_new=25)])
        e.step()
        e.step()
        weights = getattr(e, "model", None)
        e.load_weights(weights.state_dict() if weights is not None else None, 1)
        assert e.version == 1
        gens, _ = drain(e)
        (g,) = gens
        assert g.version_spans[0][0] == 0 and g.version_spans[-1][0] == 1

    def test_logprobs_match_a_forward_pass(self, h):
        if h.forward_logprobs is None:
            pytest.skip("this engine returns no tokens")
        e = h.engine
        reqs = [request(h, i, max_new=10 + i) for i in range(8)]
        e.submit(reqs[:4])
        e.step()
        e.submit(reqs[4:])  # join a running batch
        gens, _ = drain(e)
        by_id = {r.request_id: r for r in reqs}
        for g in gens:
            want = h.forward_logprobs(by_id[g.request_id].prompt_token_ids, g.token_ids)
            assert max(abs(a - b) for a, b in zip(g.logprobs, want, strict=True)) < 1e-4
