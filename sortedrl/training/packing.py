"""Length-sorted micro-batches packed to a token budget.

A micro-batch is padded only to its own longest sequence, so sorting by length before packing
keeps short samples from paying for the padding of long ones. Each micro-batch's loss is
normalised by the whole (mini-)batch's token and sequence counts (`loss.aggregate`), so summing
micro-batch gradients gives exactly the gradient of one big batch.

Layout of a collated micro-batch: `input_ids [b, L]` (prompt + response, right-padded), and
every per-token tensor `[b, L - 1]` aligned with the *targets* `input_ids[:, 1:]`: position `t`
holds the log-prob of token `t + 1`, so response token `j` of a row sits at
`prompt_len - 1 + j`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Row:
    """One response ready for training. Per-token tensors have the response's length."""

    input_ids: list[int]  # prompt + response
    prompt_len: int
    advantage: float
    mask: Tensor  # [R] float: 1.0 where the token carries loss
    staleness: Tensor  # [R] long
    logp_behav: Tensor | None = None  # [R] from the engine
    logp_prox: Tensor | None = None  # [R] filled by the trainer when recomputed
    ref_logp: Tensor | None = None  # [R] filled by the trainer when a KL penalty is used

    def __post_init__(self) -> None:
        if self.prompt_len < 1:
            raise ValueError("a row needs at least one prompt token (e.g. BOS) to predict from")
        if self.response_len < 1:
            raise ValueError("a row needs at least one response token")

    @property
    def length(self) -> int:
        return len(self.input_ids)

    @property
    def response_len(self) -> int:
        return len(self.input_ids) - self.prompt_len

    @property
    def n_loss_tokens(self) -> float:
        return float(self.mask.sum())


MAX_LENGTH_RATIO = 2
"""Longest over shortest sequence of one micro-batch: padding stays under half its tokens."""


def plan_micro_batches(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Group indices into micro-batches whose padded size `n * longest` is at most `max_tokens`
    and whose longest sequence is at most `MAX_LENGTH_RATIO` times its shortest.

    Indices are sorted by length (ties by index, so the plan is deterministic) and packed
    greedily from the shortest; a sequence longer than the budget gets a micro-batch alone.
    Returned micro-batches run from short to long. The length ratio bounds the padding: with
    long-tailed response lengths one micro-batch of everything was more than half padding, and
    on a CPU the update's cost follows the padded tokens (`train/padding_frac` reports it).
    """
    if max_tokens < 1:
        raise ValueError("max_tokens must be >= 1")
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    plan: list[list[int]] = []
    current: list[int] = []
    for i in order:
        # sorted ascending, so the newcomer is the longest of the micro-batch
        if current and (
            (len(current) + 1) * lengths[i] > max_tokens
            or lengths[i] > MAX_LENGTH_RATIO * lengths[current[0]]
        ):
            plan.append(current)
            current = []
        current.append(i)
    if current:
        plan.append(current)
    return plan


@dataclass
class MicroBatch:
    rows: list[int]  # indices into the row list it was collated from
    input_ids: Tensor  # [b, L]
    attention_mask: Tensor  # [b, L]
    targets: Tensor  # [b, L-1] = input_ids[:, 1:]
    mask: Tensor  # [b, L-1] float loss mask (0 on prompt and padding)
    response: Tensor  # [b, L-1] bool: response positions (whether or not they carry loss)
    advantages: Tensor  # [b]
    staleness: Tensor  # [b, L-1] long, 0 off the response
    logp_behav: Tensor | None  # [b, L-1], NaN where unknown
    logp_prox: Tensor | None
    ref_logp: Tensor | None
    starts: list[int]  # per row: position of its first response token in the [b, L-1] layout
    lens: list[int]  # per row: response length

    @property
    def padded_tokens(self) -> int:
        return int(self.input_ids.numel())

    def scatter(self, values: Tensor) -> list[Tensor]:
        """Per-row response slices of a `[b, L-1]` tensor (detached, on CPU)."""
        values = values.detach().float().cpu()
        return [
            values[k, s : s + n]
            for k, (s, n) in enumerate(zip(self.starts, self.lens, strict=True))
        ]


def collate(
    rows: Sequence[Row], indices: Sequence[int], pad_id: int = 0, device: str | torch.device = "cpu"
) -> MicroBatch:
    """Right-pad `rows[indices]` into one micro-batch on `device`."""
    sel = [rows[i] for i in indices]
    b = len(sel)
    L = max(r.length for r in sel)
    input_ids = torch.full((b, L), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((b, L), dtype=torch.long)
    mask = torch.zeros((b, L - 1))
    response = torch.zeros((b, L - 1), dtype=torch.bool)
    staleness = torch.zeros((b, L - 1), dtype=torch.long)
    want_behav = any(r.logp_behav is not None for r in sel)
    want_prox = any(r.logp_prox is not None for r in sel)
    want_ref = any(r.ref_logp is not None for r in sel)
    if want_prox and not all(r.logp_prox is not None for r in sel):
        raise ValueError("logp_prox must be set on all rows of a micro-batch or on none")
    if want_ref and not all(r.ref_logp is not None for r in sel):
        raise ValueError("ref_logp must be set on all rows of a micro-batch or on none")
    behav = torch.full((b, L - 1), float("nan")) if want_behav else None
    prox = torch.zeros((b, L - 1)) if want_prox else None
    ref = torch.zeros((b, L - 1)) if want_ref else None
    starts, lens = [], []
    for k, r in enumerate(sel):
        n = r.length
        input_ids[k, :n] = torch.tensor(r.input_ids, dtype=torch.long)
        attention_mask[k, :n] = 1
        s, R = r.prompt_len - 1, r.response_len
        starts.append(s)
        lens.append(R)
        mask[k, s : s + R] = r.mask.float()
        response[k, s : s + R] = True
        staleness[k, s : s + R] = r.staleness
        if behav is not None and r.logp_behav is not None:
            behav[k, s : s + R] = r.logp_behav.float()
        if prox is not None:
            prox[k, s : s + R] = r.logp_prox.float()  # type: ignore[union-attr]
        if ref is not None:
            ref[k, s : s + R] = r.ref_logp.float()  # type: ignore[union-attr]
    advantages = torch.tensor([r.advantage for r in sel], dtype=torch.float32)

    def dev(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.to(device)

    return MicroBatch(
        rows=list(indices),
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        targets=input_ids[:, 1:].to(device),
        mask=mask.to(device),
        response=response.to(device),
        advantages=advantages.to(device),
        staleness=staleness.to(device),
        logp_behav=dev(behav),
        logp_prox=dev(prox),
        ref_logp=dev(ref),
        starts=starts,
        lens=lens,
    )
