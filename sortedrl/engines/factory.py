"""Rollout engines by name: `build_engine(rollout, model_cfg, seed, model, tokenizer, version)`
builds the engine that `rollout.engine` names, through its entry in `engines/registry.py`.

Importing this module imports no engine (nor torch): an engine's module is imported when it is
built.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from typing import Any

from sortedrl.engines.config import ModelConfig, RolloutConfig
from sortedrl.engines.registry import ENGINES
from sortedrl.errors import ConfigError
from sortedrl.scheduling.protocol import Engine

#: builder(rollout, model_cfg, seed, model, tokenizer, version, *, tensor_parallel_size) -> an
#: engine serving `model`'s current weights as policy `version`.
Builder = Callable[..., Engine]


def check_engine_name(name: str) -> None:
    """A ConfigError naming `rollout.engine` unless an engine of that name can be built."""
    if name not in ENGINES:
        raise ConfigError(
            f"rollout.engine: {name!r} is not available in this version; "
            f"choose one of {', '.join(sorted(ENGINES))}"
        )
    entry = ENGINES[name]
    if entry.requires and importlib.util.find_spec(entry.requires) is None:
        raise ConfigError(
            f"rollout.engine: {name!r} needs {entry.requires}, not installed: {entry.install}"
        )


#: Rollout settings only vLLM honours: the transformers engine refuses them when they are set.
VLLM_ONLY = ("kv_cache_gib", "gpu_memory_utilization", "max_model_len", "enforce_eager")


def check_engine_settings(
    rollout: RolloutConfig, model_cfg: ModelConfig, tensor_parallel_size: int
) -> None:
    """A ValueError naming the first setting the chosen engine would not honour
    (`tensor_parallel_size`: `cluster.tensor_parallel_size`)."""
    on_gpu = str(model_cfg.device).startswith("cuda")
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
        if tensor_parallel_size != 1:
            raise ValueError(
                f"cluster.tensor_parallel_size={tensor_parallel_size}: the transformers "
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


def build_engine(
    rollout: RolloutConfig,
    model_cfg: ModelConfig,
    seed: int,
    model: Any,
    tokenizer: Any,
    version: int,
    *,
    tensor_parallel_size: int = 1,
) -> Engine:
    """The engine `rollout.engine` names, serving `model`'s weights as `version`, sampling
    with `seed`, on `tensor_parallel_size` devices (`cluster.tensor_parallel_size`). `model`
    is a model object (the engine keeps its own copy of the weights) or a Hugging Face model
    directory (the engine loads it for itself: a Ray replica holds no second copy)."""
    check_engine_name(rollout.engine)
    module, function = ENGINES[rollout.engine].builder.split(":")
    builder: Builder = getattr(importlib.import_module(module), function)
    return builder(
        rollout,
        model_cfg,
        seed,
        model,
        tokenizer,
        version,
        tensor_parallel_size=tensor_parallel_size,
    )
