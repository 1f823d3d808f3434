"""Supervised warm start: next-token cross-entropy on the response tokens of (prompt, response)
pairs, the prompt masked out. Used to give the tiny default model a format before RL."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


def encode_example(tokenizer: Any, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """Token ids of `prompt` (BOS prepended when the tokenizer has one) and of `response`
    (EOS appended when it has one), both without the tokenizer's own special tokens."""
    prompt_ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None:
        prompt_ids = [bos, *prompt_ids]
    response_ids = list(tokenizer(response, add_special_tokens=False)["input_ids"])
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None:
        response_ids = [*response_ids, eos]
    return prompt_ids, response_ids


def supervised_warm_start(
    model: nn.Module,
    tokenizer: Any,
    examples: Sequence[tuple[str, str]],
    steps: int,
    batch_size: int,
    lr: float,
    seed: int = 0,
    device: str | torch.device = "cpu",
    max_grad_norm: float = 1.0,
    weight_decay: float = 0.0,
) -> list[float]:
    """Train `model` in place for `steps` AdamW steps of `batch_size` examples each.

    Examples are drawn in seeded shuffled passes (every example once per pass). The loss is the
    mean cross-entropy over all response tokens of the batch (EOS included); prompt tokens and
    padding carry no loss. Returns the loss of each step.
    """
    if not examples:
        raise ValueError("supervised_warm_start: no examples")
    if steps < 0 or batch_size < 1 or lr <= 0:
        raise ValueError("supervised_warm_start: need steps >= 0, batch_size >= 1, lr > 0")
    dev = torch.device(device)
    model.to(dev).train()
    encoded = [encode_example(tokenizer, p, r) for p, r in examples]
    for i, (p, r) in enumerate(encoded):
        if not p or not r:
            raise ValueError(f"supervised_warm_start: example {i} has an empty prompt or response")
    pad = getattr(tokenizer, "pad_token_id", None)
    pad_id = int(pad) if pad is not None else 0
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    rng = random.Random(seed)
    order: list[int] = []
    losses: list[float] = []
    for _ in range(steps):
        batch = []
        while len(batch) < batch_size:
            if not order:
                order = list(range(len(encoded)))
                rng.shuffle(order)
            batch.append(encoded[order.pop()])
        L = max(len(p) + len(r) for p, r in batch)
        ids = torch.full((len(batch), L), pad_id, dtype=torch.long)
        attn = torch.zeros((len(batch), L), dtype=torch.long)
        labels = torch.full((len(batch), L), -100, dtype=torch.long)
        for k, (p, r) in enumerate(batch):
            n = len(p) + len(r)
            ids[k, :n] = torch.tensor(p + r)
            attn[k, :n] = 1
            labels[k, len(p) : n] = torch.tensor(r)
        ids, attn, labels = ids.to(dev), attn.to(dev), labels.to(dev)
        logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits[:, :-1]
        loss = nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]),
            labels[:, 1:].reshape(-1),
            ignore_index=-100,
        )
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]):
            continue  # a non-finite loss skips the step
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
        if math.isfinite(grad_norm):
            opt.step()
    opt.zero_grad(set_to_none=True)
    return losses
