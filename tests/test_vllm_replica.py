"""`rollout.engine=vllm` under `cluster.backend=ray`: a vLLM engine inside a replica actor
generates through the pool, takes new weights from the object store, and tags later tokens
with the new version."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")
ray = pytest.importorskip("ray")
torch = pytest.importorskip("torch")

from sortedrl.cluster.placement import Placement  # noqa: E402
from sortedrl.cluster.replicas import build_replica_pool  # noqa: E402
from sortedrl.config import TrainConfig  # noqa: E402
from sortedrl.models.tiny import build_char_tokenizer, build_tiny_model  # noqa: E402
from sortedrl.scheduling.protocol import Request  # noqa: E402
from tests.engine_contract import ALPHABET, HEADS  # noqa: E402


def _req(i: int, max_new: int) -> Request:
    prompt = [1] + [4 + (7 * i + 3 * j) % 20 for j in range(3 + i % 4)]
    return Request(f"r{i}", f"p{i}", 0, 0, len(prompt), max_new, prompt)


def _drain(pool) -> dict:
    out = {}
    for _ in range(10_000):
        if not pool.num_unfinished():
            return out
        for g in pool.step().finished:
            assert g.request_id not in out, "a request came back twice"
            out[g.request_id] = g
    raise AssertionError("the pool made no progress")


def test_a_vllm_replica_generates_and_takes_new_weights(ray_local):
    tok = build_char_tokenizer(ALPHABET)
    model = build_tiny_model(len(tok), seed=5, size="micro", **HEADS)
    cfg = TrainConfig.model_validate(
        {
            "cluster": {"backend": "ray", "rollout_replicas": 1},
            "rollout": {"engine": "vllm", "capacity": 4},
        }
    )
    placement = Placement(cfg.cluster, "sorted", "cpu")
    placement.start()
    pool = build_replica_pool(cfg, model, tok, 0, placement, None)
    try:
        pool.submit([_req(i, 6) for i in range(3)])
        first = _drain(pool)
        assert set(first) == {"r0", "r1", "r2"}
        for g in first.values():
            assert 1 <= g.n_tokens <= 6 and g.version_spans == [(0, g.n_tokens)]
            assert len(g.token_ids) == len(g.logprobs) == g.n_tokens

        gen = torch.Generator().manual_seed(0)
        new = {
            k: v + 0.05 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
            for k, v in model.state_dict().items()
        }
        pool.load_weights(new, 1)
        assert pool.version == 1 and len(pool.stats["weight_sync_s"]) == 1
        pool.submit([_req(3, 6)])
        (later,) = _drain(pool).values()
        assert later.version_spans == [(1, later.n_tokens)]
    finally:
        pool.close()
        placement.close()
