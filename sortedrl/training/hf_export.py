"""Writing the weights of an FSDP2-sharded model as a Hugging Face model directory, one tensor
at a time, so that no process holds the whole model.

Every rank walks the model's state dict in the same order; each sharded parameter is gathered
with `DTensor.full_tensor()` (a collective: every rank takes part), and only the writing rank
keeps the gathered tensor, on the CPU, in the current shard. A shard goes to disk as soon as it
reaches `shard_bytes`, so the writer holds at most one shard (plus one tensor) at a time and
the other ranks hold only their own parameter shards. The files follow `save_pretrained`'s
layout: one `model.safetensors`, or `model-0000k-of-0000n.safetensors` and the index
`model.safetensors.index.json` that maps each tensor to its file; transformers loads either.
Config and tokenizer are not weights: whoever holds them writes them beside (the driver).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import Tensor, nn
from torch.distributed.tensor import DTensor

__all__ = ["SHARD_BYTES", "export_weights"]

#: The size a weights file reaches before the next one starts: the writer's peak beyond its
#: own parameter shards.
SHARD_BYTES = 1 << 30

_PART = "part-{:05d}.safetensors.tmp"


def export_weights(
    model: nn.Module,
    path: Path,
    *,
    writer: bool,
    skip: set[str] | frozenset[str] = frozenset(),
    shard_bytes: int = SHARD_BYTES,
) -> None:
    """Write `model`'s state dict (less the names in `skip`: tied aliases) into the directory
    `path` as safetensors files of about `shard_bytes` each. Every rank of the model's group
    calls this; only the one with `writer` set writes (`path` need exist only for it)."""
    from safetensors.torch import save_file

    if shard_bytes <= 0:
        raise ValueError(f"shard_bytes must be positive, got {shard_bytes}")
    if writer:
        path.mkdir(parents=True, exist_ok=True)
    parts: list[list[str]] = []
    shard: dict[str, Tensor] = {}
    size = total = 0

    def flush() -> None:
        nonlocal shard, size
        save_file(shard, str(path / _PART.format(len(parts))), metadata={"format": "pt"})
        parts.append(list(shard))
        shard, size = {}, 0

    for name, value in model.state_dict().items():
        if name in skip:
            continue
        full = value.full_tensor() if isinstance(value, DTensor) else value
        if not writer:
            del full
            continue
        tensor = full.detach().to("cpu").contiguous()
        n = tensor.numel() * tensor.element_size()
        if shard and size + n > shard_bytes:
            flush()
        shard[name] = tensor
        size += n
        total += n
    if not writer:
        return
    if shard or not parts:
        flush()
    _name_files(path, parts, total)


def _name_files(path: Path, parts: list[list[str]], total: int) -> None:
    """Give the written parts their final names, and write the index where there are several."""
    if len(parts) == 1:
        os.replace(path / _PART.format(0), path / "model.safetensors")
        return
    weight_map: dict[str, Any] = {}
    for k, names in enumerate(parts):
        final = f"model-{k + 1:05d}-of-{len(parts):05d}.safetensors"
        os.replace(path / _PART.format(k), path / final)
        weight_map.update(dict.fromkeys(names, final))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    with open(path / "model.safetensors.index.json", "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2, sort_keys=True)
