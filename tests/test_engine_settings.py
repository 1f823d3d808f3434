"""The rollout engine's memory and precision settings: each one reaches vLLM's `EngineArgs`,
the transformers engine refuses those it cannot honour (by name), and vLLM's prefix cache is
reset at every weight load so that no block outlives the weights it was computed under."""

from __future__ import annotations

import pytest

from sortedrl.config import load_config
from sortedrl.errors import ConfigError

VLLM_SETTINGS = [
    "rollout.kv_cache_gib=2",
    "rollout.gpu_memory_utilization=0.8",
    "rollout.max_model_len=4096",
    "rollout.enforce_eager=true",
]


@pytest.mark.parametrize("setting", [*VLLM_SETTINGS, "rollout.enable_prefix_caching=true"])
def test_the_transformers_engine_refuses_each_vllm_setting_by_name(setting):
    name = setting.split("=")[0]
    with pytest.raises(ConfigError, match=f"{name}: only the vLLM engine honours"):
        load_config(None, [setting, "model.device=cuda"])


def test_the_transformers_engine_refuses_tensor_parallelism():
    with pytest.raises(ConfigError, match="cluster.tensor_parallel_size=2: the transformers"):
        load_config(None, ["cluster.backend=ray", "cluster.tensor_parallel_size=2"])


def test_vllm_on_the_cpu_refuses_what_only_a_gpu_has():
    with pytest.raises(ConfigError, match="rollout.gpu_memory_utilization: vLLM's CPU build"):
        load_config(None, ["rollout.engine=vllm", "rollout.gpu_memory_utilization=0.9"])
    with pytest.raises(ConfigError, match="rollout.enforce_eager=false: vLLM's CPU build"):
        load_config(None, ["rollout.engine=vllm", "rollout.enforce_eager=false"])


def test_the_transformers_engine_honours_the_dtype():
    pytest.importorskip("torch")
    import torch

    from sortedrl.engines.factory import build_engine
    from sortedrl.models.tiny import build_char_tokenizer, build_tiny_model

    tok = build_char_tokenizer("abc")
    model = build_tiny_model(len(tok), seed=0, size="micro")
    for dtype, want in (("bfloat16", torch.bfloat16), ("auto", torch.float32)):
        cfg = load_config(None, [f"rollout.dtype={dtype}"])
        engine = build_engine(cfg.rollout, cfg.model, cfg.seed, model, tok, 0)
        assert {p.dtype for p in engine.model.parameters()} == {want}
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # the trainer's stays


# --- vLLM -------------------------------------------------------------------------------------


class _Captured(Exception):
    """Raised in place of vLLM's start-up once its arguments are recorded."""


@pytest.fixture
def captured(monkeypatch):
    """The `EngineArgs` each VLLMEngine is started with (vLLM itself does not start)."""
    pytest.importorskip("vllm")
    from vllm.v1.engine.llm_engine import LLMEngine

    seen = []

    def record(args, *a, **k):
        seen.append(args)
        raise _Captured

    monkeypatch.setattr(LLMEngine, "from_engine_args", staticmethod(record))
    return seen


def _build(cfg):
    from sortedrl.engines.factory import build_engine
    from sortedrl.models.tiny import build_char_tokenizer, build_tiny_model

    tok = build_char_tokenizer("abc")
    model = build_tiny_model(len(tok), seed=0, size="micro", num_attention_heads=2)
    with pytest.raises(_Captured):
        build_engine(
            cfg.rollout,
            cfg.model,
            cfg.seed,
            model,
            tok,
            0,
            tensor_parallel_size=cfg.cluster.tensor_parallel_size,
        )


def test_each_gpu_setting_reaches_vllms_engine_args(captured, monkeypatch):
    from vllm.platforms import current_platform

    # The CPU build is installed here: the engine is told it runs on CUDA, so that the GPU
    # settings pass its platform check; the arguments are captured before vLLM starts.
    monkeypatch.setattr(current_platform, "device_type", "cuda")
    cfg = load_config(
        None,
        [
            "rollout.engine=vllm",
            "model.device=cuda",
            "cluster.backend=ray",
            "cluster.layout=separate",
            "cluster.tensor_parallel_size=4",
            "rollout.dtype=bfloat16",
            "rollout.gpu_memory_utilization=0.85",
            "rollout.max_model_len=3000",
            "rollout.enforce_eager=false",
            "rollout.enable_prefix_caching=true",
        ],
    )
    _build(cfg)
    (args,) = captured
    assert args.tensor_parallel_size == 4
    assert args.distributed_executor_backend == "mp"  # workers in the replica's own process
    assert args.dtype == "bfloat16"
    assert args.gpu_memory_utilization == 0.85
    assert args.kv_cache_memory_bytes is None  # gpu_memory_utilization sizes the cache
    assert args.max_model_len == 3000
    assert args.enforce_eager is False
    assert args.enable_prefix_caching is True
    assert args.max_num_seqs == cfg.rollout.capacity


def test_a_kv_cache_size_reaches_vllm_in_bytes(captured):
    _build(load_config(None, ["rollout.engine=vllm", "rollout.kv_cache_gib=1.5"]))
    (args,) = captured
    assert args.kv_cache_memory_bytes == 3 * 2**29  # 1.5 GiB


def test_the_cpu_defaults_are_those_vllm_ran_with_before_they_were_settings(captured):
    _build(load_config(None, ["rollout.engine=vllm"]))
    (args,) = captured
    assert args.dtype == "float32"
    assert args.kv_cache_memory_bytes == 2**28  # 0.25 GiB
    assert args.gpu_memory_utilization == 0.5
    assert args.enforce_eager is True
    assert args.enable_prefix_caching is False
    assert args.tensor_parallel_size == 1 and args.distributed_executor_backend is None
    assert args.max_model_len == 512  # the tiny model's max_position_embeddings


def test_a_gpu_left_to_its_defaults_gets_graphs_and_half_its_memory(captured, monkeypatch):
    from vllm.platforms import current_platform

    monkeypatch.setattr(current_platform, "device_type", "cuda")
    _build(load_config(None, ["rollout.engine=vllm", "model.device=cuda"]))
    (args,) = captured
    assert args.dtype == "auto" and args.enforce_eager is False
    assert args.kv_cache_memory_bytes is None and args.gpu_memory_utilization == 0.5


def test_prefix_caching_is_reset_at_every_weight_load():
    """A real vLLM engine (CPU) with prefix caching: a prompt cached under the old weights is
    answered after a weight load with the new model's log-probs, as a plain forward pass of
    the new model gives them, not from blocks the old weights computed."""
    pytest.importorskip("vllm")
    import torch

    from sortedrl.engines.vllm_engine import VLLMEngine
    from sortedrl.models.tiny import build_char_tokenizer, build_tiny_model
    from sortedrl.scheduling.protocol import Request

    tok = build_char_tokenizer("0123456789abcdefghij")
    heads = dict(num_attention_heads=2, num_key_value_heads=1)
    old = build_tiny_model(len(tok), seed=1, size="micro", **heads)
    new = build_tiny_model(len(tok), seed=2, size="micro", **heads)
    # Two full KV blocks (vLLM's CPU block is 128 tokens), which prefix caching would reuse.
    prompt = [1] + [4 + (5 * j) % 17 for j in range(259)]

    def answer(engine, rid):
        engine.submit([Request(rid, "p", 0, 0, len(prompt), 4, prompt)])
        for _ in range(100):
            for g in engine.step().finished:
                return g
        raise AssertionError("no answer")

    @torch.no_grad()
    def forward_logprobs(model, response):
        ids = torch.tensor([prompt + response])
        lp = torch.log_softmax(model(ids).logits[0, len(prompt) - 1 : -1].float(), -1)
        return lp[torch.arange(len(response)), torch.tensor(response)].tolist()

    with VLLMEngine(
        old,
        tok,
        capacity=2,
        temperature=1.0,
        stop_token_ids=[],
        max_model_len=320,
        kv_cache_gib=0.02,
        enable_prefix_caching=True,
    ) as engine:
        assert engine.engine_args.enable_prefix_caching is True
        answer(engine, "a")  # fills the cache with the prompt's blocks under `old`
        engine.load_weights(new.state_dict(), 1)
        assert engine.stats["prefix_cache_resets"] == 1
        g = answer(engine, "b")
        want = forward_logprobs(new, g.token_ids)
        assert max(abs(a - b) for a, b in zip(g.logprobs, want, strict=True)) < 1e-3
        # The old model would have given other log-probs: the test can tell the two apart.
        stale = forward_logprobs(old, g.token_ids)
        assert max(abs(a - b) for a, b in zip(g.logprobs, stale, strict=True)) > 1e-2


def test_an_engine_built_from_a_model_directory_serves_its_weights(tmp_path):
    """A Ray replica builds its engine from the files the driver wrote: its own load, no
    second copy of a model object."""
    import torch

    from sortedrl.engines.factory import build_engine
    from sortedrl.models.tiny import build_char_tokenizer, build_tiny_model

    tok = build_char_tokenizer("abc")
    model = build_tiny_model(len(tok), seed=3, size="micro")
    model.save_pretrained(tmp_path / "m", safe_serialization=True)
    cfg = load_config(None, [])
    engine = build_engine(cfg.rollout, cfg.model, cfg.seed, str(tmp_path / "m"), tok, 4)
    assert engine.version == 4
    got, want = engine.model.state_dict(), model.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
