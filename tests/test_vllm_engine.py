"""What the vLLM engine adds to the engine contract: log-probs at a temperature, new weights,
stop tokens, resumed partials, reproducible sampling and the errors it gives.

One engine serves the module (it takes seconds to start); each test leaves it empty.
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")
torch = pytest.importorskip("torch")

from sortedrl.engines.vllm_engine import VLLMEngine, request_seed  # noqa: E402
from sortedrl.models.tiny import build_char_tokenizer, build_tiny_model  # noqa: E402
from sortedrl.scheduling.protocol import Partial, Request  # noqa: E402
from tests.engine_contract import ALPHABET, HEADS  # noqa: E402

TEMPERATURE = 0.7


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer(ALPHABET)


@pytest.fixture(scope="module")
def model(tok):
    return build_tiny_model(len(tok), seed=5, size="micro", **HEADS)


@pytest.fixture(scope="module")
def engine(tok, model):
    e = VLLMEngine(
        model,
        tok,
        capacity=4,
        temperature=TEMPERATURE,
        stop_token_ids=[],
        seed=11,
        max_model_len=96,
        kv_cache_gib=0.02,
    )
    yield e
    e.close()


@pytest.fixture
def e(engine, model):
    """The module's engine, empty, at version 0 with the module model's weights, sampling."""
    engine.pause()
    engine.load_weights(model.state_dict(), 0)
    engine.temperature = TEMPERATURE
    engine.stop_token_ids = frozenset()
    return engine


def _req(i: int, max_new: int, rid: str = "", resume: Partial | None = None) -> Request:
    prompt = [1] + [4 + (7 * i + 3 * j) % 20 for j in range(3 + i % 4)]
    return Request(rid or f"r{i}", f"p{i}", 0, 0, len(prompt), max_new, prompt, resume)


def _drain(e) -> dict:
    out = {}
    for _ in range(10_000):
        if not e.num_unfinished():
            return out
        for g in e.step().finished:
            out[g.request_id] = g
    raise AssertionError("engine made no progress")


@torch.no_grad()
def _forward_logprobs(model, prompt, response, temperature):
    ids = torch.tensor([prompt + response])
    logits = model(ids).logits[0, len(prompt) - 1 : -1].float()
    lp = torch.log_softmax(logits / temperature, -1)
    return lp[torch.arange(len(response)), torch.tensor(response)].tolist()


@torch.no_grad()
def _greedy(model, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


def test_sampled_logprobs_equal_the_trainers_log_softmax_at_the_temperature(e, model):
    reqs = [_req(i, 12 + i) for i in range(6)]
    e.submit(reqs[:3])
    e.step()
    e.submit(reqs[3:])  # join a running batch
    gens = _drain(e)
    assert len(gens) == 6
    for r in reqs:
        g = gens[r.request_id]
        want = _forward_logprobs(model, r.prompt_token_ids, g.token_ids, TEMPERATURE)
        assert max(abs(a - b) for a, b in zip(g.logprobs, want, strict=True)) < 1e-3
    # At temperature 1 the same tokens would have other log-probs: the test can tell.
    g = gens["r0"]
    at_one = _forward_logprobs(model, reqs[0].prompt_token_ids, g.token_ids, 1.0)
    assert max(abs(a - b) for a, b in zip(g.logprobs, at_one, strict=True)) > 1e-2


def test_new_weights_change_greedy_outputs_to_those_of_the_new_model(e, tok, model):
    other = build_tiny_model(len(tok), seed=6, size="micro", **HEADS)
    e.temperature = 0.0
    prompt = _req(0, 16).prompt_token_ids
    assert _greedy(other, prompt, 16) != _greedy(model, prompt, 16)  # the models differ
    seconds = e.load_weights(other.state_dict(), 3)
    assert seconds > 0 and e.version == 3
    e.submit([_req(0, 16)])
    (g,) = _drain(e).values()
    assert g.token_ids == _greedy(other, prompt, 16)
    assert g.version_spans == [(3, 16)]


def test_running_responses_continue_under_new_weights_with_later_versions(e, model):
    e.temperature = 0.0
    e.submit([_req(1, 20)])
    e.step()
    e.step()
    e.load_weights(model.state_dict(), 1)
    (g,) = _drain(e).values()
    assert g.version_spans == [(0, 2), (1, 18)]


def test_reprefill_on_load_resubmits_running_responses_and_keeps_their_tokens(e, model):
    e.temperature = 0.0
    e.submit([_req(2, 20, rid="straight")])
    straight = _drain(e)["straight"]
    e.reprefill_on_load = True
    try:
        e.submit([_req(2, 20)])
        for _ in range(4):
            e.step()
        e.load_weights(model.state_dict(), 1)  # same weights: the same greedy tokens
        (g,) = _drain(e).values()
    finally:
        e.reprefill_on_load = False
    assert g.token_ids == straight.token_ids
    assert g.version_spans == [(0, 4), (1, 16)]


def test_a_stop_token_ends_the_response_and_is_part_of_it(e):
    e.temperature = 0.0
    e.submit([_req(3, 30, rid="free")])
    free = _drain(e)["free"]
    stop = free.token_ids[4]
    e.stop_token_ids = frozenset({stop})
    e.submit([_req(3, 30)])
    (g,) = _drain(e).values()
    first = free.token_ids.index(stop)
    assert g.finish_reason == "stop"
    assert g.token_ids == free.token_ids[: first + 1]


def test_a_resumed_partial_gets_only_the_tokens_it_lacks(e):
    e.submit([_req(4, 25)])
    for _ in range(5):
        e.step()
    (p,) = e.pause()
    assert p.finish_reason == "abort" and p.n_tokens == 5
    e.submit([_req(4, 25, rid="again", resume=p.as_partial())])
    g = _drain(e)["again"]
    assert g.n_tokens == 25 and g.finish_reason == "length"
    assert g.token_ids[:5] == p.token_ids and g.logprobs[:5] == p.logprobs


def test_a_partial_already_complete_comes_back_at_the_next_step(e):
    done = Partial(3, [(0, 3)], [5, 6, 7], [-1.0, -1.0, -1.0])
    e.submit([_req(5, 3, resume=done)])
    assert e.num_unfinished() == 1 and e.num_running() == 0
    report = e.step()
    assert [g.finish_reason for g in report.finished] == ["length"]
    assert report.finished[0].token_ids == [5, 6, 7]


def test_the_same_rng_state_replays_the_same_samples(e):
    state = e.rng_state()
    e.submit([_req(i, 15) for i in range(3)])
    first = _drain(e)
    e.submit([_req(i, 15) for i in range(3)])
    other = _drain(e)
    e.set_rng_state(state)
    e.submit([_req(i, 15) for i in range(3)])
    replay = _drain(e)
    assert [first[k].token_ids for k in sorted(first)] == [
        replay[k].token_ids for k in sorted(replay)
    ]
    assert [first[k].token_ids for k in sorted(first)] != [
        other[k].token_ids for k in sorted(other)
    ]
    assert request_seed(11, 0) != request_seed(11, 1) != request_seed(12, 1)


def test_capacity_and_kv_cache_limit_are_reported(e):
    assert e.capacity == 4
    assert e.kv_cache_tokens > 0
    assert e.kv_cache_sequences == e.kv_cache_tokens // e.max_model_len
    e.submit([_req(i, 10) for i in range(9)])
    for _ in range(3):
        report = e.step()
        assert report.busy_slot_s <= e.capacity * report.elapsed_s + 1e-12
    _drain(e)


def test_bad_requests_and_weights_get_clear_errors(e, model):
    with pytest.raises(ValueError, match="exceed max_model_len 96"):
        e.submit([_req(0, 200)])
    with pytest.raises(ValueError, match="already unfinished"):
        e.submit([_req(0, 5), _req(0, 5)])
    with pytest.raises(ValueError, match="missing"):
        e.load_weights({"lm_head.weight": model.lm_head.weight}, 1)
    with pytest.raises(TypeError, match="state dict"):
        e.load_weights([1, 2], 1)
    assert e.num_unfinished() == 0 and e.version == 0


def test_unsupported_settings_are_refused_before_starting(tok, model):
    from vllm.platforms import current_platform

    with pytest.raises(ValueError, match="top_p=0.9 with temperature=0.7"):
        VLLMEngine(model, tok, temperature=0.7, top_p=0.9)
    here = current_platform.device_type
    with pytest.raises(ValueError, match=f"installed vLLM build runs on {here!r}"):
        VLLMEngine(model, tok, device="cpu" if here == "cuda" else "cuda")
    if current_platform.is_cpu():
        micro = build_tiny_model(len(tok), seed=5, size="micro")  # head size 16
        with pytest.raises(ValueError, match="head size 16"):
            VLLMEngine(micro, tok)


def test_only_the_rotary_reload_warning_is_dropped():
    import logging

    from sortedrl.engines.vllm_engine import _drop_rotary_reload_warning

    def record(*args):
        return logging.LogRecord(
            "x", logging.WARNING, "f", 1, "%s: Failed to load weights", args, None
        )

    assert not _drop_rotary_reload_warning(record("RotaryEmbedding"))
    assert _drop_rotary_reload_warning(record("QKVParallelLinear"))
    other = logging.LogRecord("x", logging.WARNING, "f", 1, "something else %s", ("a",), None)
    assert _drop_rotary_reload_warning(other)
