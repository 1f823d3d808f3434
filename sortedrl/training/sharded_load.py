"""Building an FSDP2-sharded model from a Hugging Face model directory, each rank reading only
its own shards.

The model is built with its parameters on the meta device (no memory, no initialisation), so
no rank ever holds the whole model. Its buffers are built for real on the CPU: they are small
and some are computed, not stored (a rotary embedding's `inv_freq` is in no checkpoint).
`fully_shard` then turns every parameter into a DTensor sharded over the mesh, still on meta;
`to_empty` allocates each rank's local shard on its device, and each shard is filled from the
safetensors files by reading only its rows (`safe_open(...).get_slice`), at the offset the
DTensor's placement gives it. The result equals a full `from_pretrained` load bit for bit
(`tests/test_sharded_load.py`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

__all__ = ["load_sharded", "parameters_on_meta", "safetensors_index"]


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device, their buffers as usual.

    A parameter is moved to meta as it is registered, before the module initialises it, so
    the initialisation costs nothing and the CPU tensor it was made from is never touched.
    """
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            p = module._parameters[name]
            assert p is not None
            module._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def safetensors_index(path: str | Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file of `path` holding it."""
    from safetensors import safe_open

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors files (a Hugging Face model directory)")
    where: dict[str, Path] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                where[name] = f
    return where


def load_sharded(
    path: str | Path,
    shard: Callable[[nn.Module], nn.Module],
    device: torch.device,
    mesh: DeviceMesh,
) -> nn.Module:
    """The causal LM of the model directory `path`, built on meta, sharded by `shard` (which
    calls `fully_shard`), its local shards allocated on `device` and read from the files."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    model = shard(model)
    model.to_empty(device=device)
    with torch.no_grad():
        for name, b in model.named_buffers():  # to_empty left them uninitialised
            b.copy_(buffers[name])
        _fill_shards(model, path, mesh)
    return model


def _fill_shards(model: nn.Module, path: str | Path, mesh: DeviceMesh) -> None:
    from safetensors import safe_open
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    where = safetensors_index(path)
    # Tied parameters are one parameter under their first name (a tied lm_head is saved once,
    # under the embedding's name).
    wanted = dict(model.named_parameters())
    missing = sorted(set(wanted) - set(where))
    if missing:
        raise ValueError(f"{path}: the model's weights {missing[:5]} are not in its files")
    by_file: dict[Path, list[str]] = {}
    for name in wanted:
        by_file.setdefault(where[name], []).append(name)
    for f, names in by_file.items():
        with safe_open(str(f), framework="pt") as st:
            for name in names:
                param = wanted[name]
                stored = st.get_slice(name)
                if list(stored.get_shape()) != list(param.shape):
                    raise ValueError(
                        f"{f}: {name} has shape {stored.get_shape()}, the model's is "
                        f"{list(param.shape)}"
                    )
                if isinstance(param, DTensor):
                    shape, offset = compute_local_shape_and_global_offset(
                        param.shape, param.device_mesh, param.placements
                    )
                    local = param.to_local()
                else:  # a parameter left whole
                    shape, offset, local = tuple(param.shape), (0,) * param.dim(), param.data
                index = tuple(slice(o, o + n) for o, n in zip(offset, shape, strict=True))
                part = stored[index] if local.numel() else None
                if part is not None:
                    local.copy_(_as_tensor(part).to(local.dtype))


def _as_tensor(x: Any) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(x)
