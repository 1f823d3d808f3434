"""The transformers engine's KV cache: one preallocated buffer per layer, rows of running
sequences right-aligned at a shared write column (see `sortedrl.engines.transformers_engine`)."""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class SlotLayer(CacheLayerMixin):
    """One layer's slice of `SlotKV`, shaped as a transformers cache layer.

    Before each forward the engine sets the rows being run, the columns to write and the
    column window to attend over; `update` writes the new keys/values in place and returns a
    view of the window.
    """

    is_compileable = False
    is_sliding = False
    is_croppable = False

    def __init__(self, owner: SlotKV, idx: int):
        super().__init__()
        self.owner, self.idx = owner, idx
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:  # pragma: no cover
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        o = self.owner
        if not o.allocated:
            o.allocate(key_states)
        k, v = o.keys[self.idx], o.values[self.idx]
        rows, w0, w1 = o.rows, o.write_start, o.write_start + key_states.shape[-2]
        k[rows, :, w0:w1] = key_states
        v[rows, :, w0:w1] = value_states
        return k[rows, :, o.window_start : w1], v[rows, :, o.window_start : w1]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        o = self.owner
        return o.write_start + query_length - o.window_start, 0

    def get_seq_length(self) -> int:
        return self.owner.write_start - self.owner.window_start

    def get_max_length(self) -> int:
        return -1


class SlotKV(Cache):
    """Per-layer KV buffers `[capacity, kv_heads, columns, head_dim]` shared by the running batch."""

    def __init__(self, num_layers: int, capacity: int, columns: int = 256):
        self.capacity = capacity
        self.columns = columns
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.allocated = False
        self.rows = slice(0, 0)
        self.write_start = 0
        self.window_start = 0
        super().__init__(layers=[SlotLayer(self, i) for i in range(num_layers)])

    def allocate(self, like: torch.Tensor) -> None:
        _, heads, _, dim = like.shape
        shape = (self.capacity, heads, self.columns, dim)
        self.keys = [like.new_zeros(shape) for _ in self.layers]
        self.values = [like.new_zeros(shape) for _ in self.layers]
        self.allocated = True

    def free(self) -> None:
        self.keys, self.values, self.allocated = [], [], False

    def ensure_columns(self, needed: int) -> None:
        """Grow the buffers so that columns `0..needed-1` exist."""
        if needed <= self.columns:
            return
        new = max(needed, self.columns + self.columns // 2, 64)
        if self.allocated:
            for buf in (self.keys, self.values):
                for i, t in enumerate(buf):
                    grown = t.new_zeros(t.shape[0], t.shape[1], new, t.shape[3])
                    grown[:, :, : self.columns] = t
                    buf[i] = grown
        self.columns = new

    def shift(self, rows: int, src: int, dst: int, length: int) -> None:
        """Move columns `src..src+length-1` of rows `0..rows-1` to start at column `dst`."""
        if not self.allocated or rows == 0 or length == 0 or src == dst:
            return
        for buf in (self.keys, self.values):
            for t in buf:
                t[:rows, :, dst : dst + length] = t[:rows, :, src : src + length].clone()

    def move_row(self, src: int, dst: int, upto: int) -> None:
        if not self.allocated:
            return
        for buf in (self.keys, self.values):
            for t in buf:
                t[dst, :, :upto] = t[src, :, :upto]
