"""The roofline cost model: sane numbers, exact closed forms, clear errors."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sortedrl.engines.costmodel import (
    H100_SXM,
    PRESETS,
    ClusterSpec,
    CostModel,
    CostModelError,
    get_preset,
)
from sortedrl.errors import ConfigError

LLAMA = get_preset("llama3.1-8b-h100")
QWEN = get_preset("qwen2.5-32b-h100")

# A slow-compute accelerator: decode is compute bound for small KV and memory bound for large
# KV, so the closed form must split at the crossing.
SLOW_FLOPS = dataclasses.replace(
    LLAMA, name="slow-flops", accelerator=dataclasses.replace(H100_SXM, flops_per_s=500e12)
)


def test_presets_build_and_describe():
    assert {"llama3.1-8b-h100", "qwen2.5-32b-h100", "test-tiny"} <= set(PRESETS)
    for spec in PRESETS.values():
        cm = CostModel(spec)
        text = cm.describe()
        assert spec.name in text and "KV capacity" in text and "source" in text
        assert cm.capacity == cm.replicas * spec.max_num_seqs
        assert spec.response_cap >= 64


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ConfigError) as e:
        get_preset("gpt-5-on-a-toaster")
    msg = str(e.value)
    assert "gpt-5-on-a-toaster" in msg and "llama3.1-8b-h100" in msg and "test-tiny" in msg


def test_llama_8b_numbers_are_sane():
    cm = CostModel(LLAMA)
    assert LLAMA.response_cap == 16384
    assert cm.replicas == 8 and cm.tp == 1
    # 2 (K,V) * 32 layers * 8 heads * 128 * 2 bytes
    assert cm.kv_bytes_per_token == 131072
    assert 15e9 < cm.weight_bytes < 17e9
    # Tens of GB of KV per GPU: a few hundred thousand tokens.
    assert 2e5 < cm.kv_capacity_tokens < 1e6
    # One sequence: reading the weights once, at achievable bandwidth, plus a little.
    floor = cm.weight_bytes / H100_SXM.bandwidth_bytes_per_s
    one = cm.decode_step_time(1, 1000)
    assert floor < one < 1.6 * floor
    assert 5e-3 < one < 10e-3
    # More sequences and more KV cost more; a full replica stays in tens of milliseconds.
    full = cm.decode_step_time(LLAMA.max_num_seqs, cm.kv_capacity_tokens)
    assert one < full < 60e-3
    # Throughput of a full replica: thousands of tokens per second.
    assert 2000 < LLAMA.max_num_seqs / full < 20000


def test_qwen_32b_uses_tensor_parallelism():
    cm = CostModel(QWEN)
    assert cm.tp == 4 and cm.replicas == QWEN.gpus // 4
    assert cm.kv_bytes_per_token == 2 * 64 * 8 * 128 * 2
    # Weights split over 4 GPUs: a single-sequence step is ~weights/(4*bandwidth).
    floor = cm.weight_bytes / (4 * H100_SXM.bandwidth_bytes_per_s)
    assert floor < cm.decode_step_time(1, 1000) < 2.0 * floor
    # A bigger model is slower per token than the 8B one.
    assert cm.prefill_time(1000) > CostModel(LLAMA).prefill_time(1000)


def test_weights_that_do_not_fit_are_a_clear_error():
    spec = dataclasses.replace(QWEN, tp=1, gpus=8, gpu_memory_utilization=0.7)
    with pytest.raises(CostModelError) as e:
        CostModel(spec)
    msg = str(e.value)
    assert "qwen2.5-32b-h100" in msg and "Qwen2.5-32B" in msg and "H100" in msg
    assert "weights" in msg
    assert isinstance(e.value, ConfigError)


def test_kv_too_small_for_one_sequence_is_a_clear_error():
    # Leave ~1000 tokens of KV: less than one 16k response.
    mem = (LLAMA.model.weight_bytes + 1000 * 131072) / LLAMA.gpu_memory_utilization
    mem += LLAMA.reserve_bytes_per_gpu / LLAMA.gpu_memory_utilization
    spec = dataclasses.replace(LLAMA, accelerator=dataclasses.replace(H100_SXM, memory_bytes=mem))
    with pytest.raises(CostModelError) as e:
        CostModel(spec)
    assert "max-length sequence" in str(e.value) and "llama3.1-8b-h100" in str(e.value)


def test_gpu_override_changes_replicas():
    assert CostModel(LLAMA, gpus=4).replicas == 4
    assert CostModel(QWEN, gpus=8).replicas == 2
    with pytest.raises(CostModelError):
        CostModel(QWEN, gpus=2)  # fewer GPUs than one tensor-parallel group


def _per_step_sum(cm: CostModel, n: int, kv: int, k: int) -> float:
    return sum(cm.decode_step_time(n, kv + n * j) for j in range(k))


@pytest.mark.parametrize("spec", [LLAMA, QWEN, SLOW_FLOPS, PRESETS["test-tiny"]], ids=str)
def test_closed_form_equals_per_step_sum_at_fixed_points(spec: ClusterSpec):
    cm = CostModel(spec)
    for n, kv, k in [(1, 0, 1), (1, 512, 300), (96, 50_000, 37), (512, 0, 1000), (7, 10, 0)]:
        assert cm.decode_steps_time(n, kv, k) == pytest.approx(
            _per_step_sum(cm, n, kv, k), rel=1e-9, abs=1e-12
        )


def test_slow_flops_spec_crosses_inside_the_range():
    cm = CostModel(SLOW_FLOPS)
    n = 256
    first, last = cm.decode_step_time(n, 0), cm.decode_step_time(n, n * 999)
    mem0 = cm._m0 + cm._m1 * 0
    comp0 = cm._c0 * n
    assert comp0 > mem0  # compute bound at the start
    assert cm._m0 + cm._m1 * n * 999 > cm._c0 * n + cm._c1 * n * 999  # memory bound at the end
    assert last > first


@settings(max_examples=60, deadline=None)
@given(
    which=st.sampled_from([LLAMA, QWEN, SLOW_FLOPS]),
    n=st.integers(1, 600),
    kv=st.integers(0, 300_000),
    k=st.integers(0, 400),
)
def test_closed_form_equals_per_step_sum(which: ClusterSpec, n: int, kv: int, k: int):
    cm = CostModel(which)
    assert cm.decode_steps_time(n, kv, k) == pytest.approx(
        _per_step_sum(cm, n, kv, k), rel=1e-9, abs=1e-12
    )


def test_prefill_is_compute_bound_and_superlinear():
    cm = CostModel(LLAMA)
    t = cm.prefill_time(1000)
    linear = 2 * LLAMA.model.params * 1000 / (H100_SXM.flops_per_s * H100_SXM.prefill_mfu)
    assert linear <= t < 1.2 * linear
    assert cm.prefill_time(16000) > 16 * t  # attention grows quadratically
    assert cm.prefill_time(0) == 0.0


def test_update_and_sync_times():
    cm = CostModel(LLAMA)
    tokens = 1_000_000
    expected = (6 + 2) * LLAMA.model.params * tokens / (8 * 989e12 * LLAMA.training_mfu)
    t = cm.update_time(tokens)
    assert t == pytest.approx(expected + LLAMA.update_overhead_s)
    # Fewer GPUs: slower; no extra forward pass: faster; attention adds.
    assert cm.update_time(tokens, gpus=4) > t
    assert cm.update_time(tokens, extra_forward_passes=0) < t
    assert cm.update_time(tokens, sum_sq_seq_len=tokens * 16384) > t
    assert 0.5 < cm.weight_sync_time() < 10
    assert CostModel(QWEN).weight_sync_time() > cm.weight_sync_time()
    with pytest.raises(ConfigError):
        cm.update_time(tokens, gpus=0)
