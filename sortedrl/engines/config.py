"""`model` and `rollout` settings: the policy model and the engine that generates with it."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from sortedrl.engines.registry import ENGINES

# The engine names, derived from the registry: a new engine is one entry there.
EngineName = Literal[tuple(ENGINES)]  # type: ignore[valid-type]


class ModelConfig(BaseModel):
    """The policy model: a Hugging Face directory, or the embedded tiny model and its warm
    start."""

    model_config = ConfigDict(extra="forbid")
    path: str | None = Field(
        None, description="a Hugging Face model directory; empty: the embedded tiny model"
    )
    tiny_size: str = Field("default", description="size of the embedded tiny model")
    warm_start_steps: int = Field(
        150, ge=0, description="supervised steps on task solutions before RL (tiny model only)"
    )
    warm_start_examples: int = Field(
        2048, ge=1, description="distinct task solutions the warm start draws from"
    )
    warm_start_batch: int = Field(32, ge=1, description="task solutions per warm-start step")
    warm_start_lr: float = Field(3e-3, gt=0, description="learning rate of the warm start")
    device: str = Field("cpu", description="cpu, cuda, cuda:1, ...")


class RolloutConfig(BaseModel):
    """The rollout engine and how it samples."""

    model_config = ConfigDict(extra="forbid")
    engine: EngineName = Field(
        "transformers", description=f"the rollout engine: {', '.join(ENGINES)}"
    )
    capacity: int = Field(
        64,
        ge=1,
        description="engine capacity C: sequences run at once (per replica: the replica pool of "
        "cluster.rollout_replicas runs their sum)",
    )
    temperature: float = Field(
        1.0,
        gt=0,
        description="the one sampling temperature: the engine samples at it and the trainer "
        "recomputes log-probs at it",
    )
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling: 1 samples from all")
    pause_for_update: bool | None = Field(
        None,
        description="pause the engine and free its KV cache for each update, re-prefilling the "
        "partial responses after it (colocated on a GPU); false: keep the cache and go on "
        "under the new weights; empty: pause unless the model runs on the CPU",
    )
    # Engine memory and precision. vLLM honours all of them; the transformers engine honours
    # `dtype` and refuses the others (its KV cache grows with the batch, it has no graphs).
    dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = Field(
        None,
        description="the rollout engine's precision; auto: the model's own dtype; empty: "
        "float32 on the CPU, auto on a GPU (vLLM), the trainer's precision (transformers)",
    )
    kv_cache_gib: float | None = Field(
        None,
        gt=0,
        description="vLLM: the KV cache's memory per replica in GiB; empty: 0.25 on the CPU "
        "(VLLM_CPU_KVCACHE_SPACE in the environment takes precedence), and on a GPU what "
        "gpu_memory_utilization leaves after the weights and activations",
    )
    gpu_memory_utilization: float | None = Field(
        None,
        gt=0,
        le=1,
        description="vLLM on a GPU, with kv_cache_gib empty: the share of each GPU's memory "
        "vLLM may take for weights, activations and KV cache; empty: 0.5 (a colocated trainer "
        "rank needs the rest; raise it to about 0.9 with cluster.layout=separate). Refused "
        "on the CPU, where rollout.kv_cache_gib sizes the cache",
    )
    max_model_len: int | None = Field(
        None,
        ge=1,
        description="vLLM: the most tokens of prompt + response a sequence may hold (its KV "
        "cache is planned for that length); empty: the model's max_position_embeddings",
    )
    enforce_eager: bool | None = Field(
        None,
        description="vLLM: run without CUDA graphs (less memory, slower decode); empty: true "
        "on the CPU (vLLM's CPU build has no graphs), false on a GPU",
    )
    enable_prefix_caching: bool = Field(
        False,
        description="vLLM: reuse the KV blocks of shared prompt prefixes (a group's samples "
        "share their prompt); the cache is reset at every weight load, since blocks computed "
        "under old weights are wrong under new ones",
    )
