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

#: builder(rollout, model_cfg, seed, model, tokenizer, version) -> an engine serving `model`'s
#: current weights as policy `version`.
Builder = Callable[[RolloutConfig, ModelConfig, int, Any, Any, int], Engine]


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


def build_engine(
    rollout: RolloutConfig,
    model_cfg: ModelConfig,
    seed: int,
    model: Any,
    tokenizer: Any,
    version: int,
) -> Engine:
    """The engine `rollout.engine` names, serving `model`'s weights as `version`, sampling
    with `seed`."""
    check_engine_name(rollout.engine)
    module, function = ENGINES[rollout.engine].builder.split(":")
    builder: Builder = getattr(importlib.import_module(module), function)
    return builder(rollout, model_cfg, seed, model, tokenizer, version)
