"""The RL objective as pure functions on tensors.

Layout: every per-token tensor is `[batch, time]` and comes with a loss `mask` of the same
shape (1.0 where the token carries loss, 0.0 for prompt, padding and masked-out responses).

The policy-gradient loss per token is the clipped surrogate of PPO/GRPO in its *decoupled* form
(Hilton et al., "Batch size-invariance for policy optimization", as used by AReaL for stale
tokens):

    ratio  = exp(logp - logp_prox)                          # against the proximal policy
    w      = min(exp(logp_prox - logp_behav), max_is_weight)  # truncated importance weight
    pg_tok = -w * min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A)

`logp` is the current policy (with gradient), `logp_prox` the policy at the start of the update
(recomputed without gradient), `logp_behav` the policy that sampled the token (reported by the
engine). For fresh tokens and a single optimizer step all three coincide in value, `w == 1`
and the loss is exactly GRPO's. An optional KL penalty to a reference model is added per token
with the k3 estimator. The per-token losses are then aggregated by `loss_agg` (see
`aggregate`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

LossAgg = Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"]
LOSS_AGGS: tuple[str, ...] = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")


def group_advantages(rewards: Tensor, normalize_std: bool = True, eps: float = 1e-6) -> Tensor:
    """Group-relative advantages for `rewards` of shape `[n_groups, G]`.

    `A = r - mean_group(r)`, divided by `std_group(r) + eps` when `normalize_std` (GRPO, DAPO).
    Dr. GRPO turns the division off: it up-weights groups whose rewards barely differ (nearly
    solved or nearly hopeless prompts). The std is the unbiased one (divisor `G - 1`, as in TRL
    and verl); a group of one has advantage 0.
    """
    if rewards.dim() != 2:
        raise ValueError(
            f"rewards must be [n_groups, group_size], got shape {tuple(rewards.shape)}"
        )
    rewards = rewards.float()
    adv = rewards - rewards.mean(dim=1, keepdim=True)
    if normalize_std and rewards.shape[1] > 1:
        adv = adv / (rewards.std(dim=1, keepdim=True, unbiased=True) + eps)
    return adv


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token k3 estimate of KL(policy || reference): `exp(ref - logp) - (ref - logp) - 1`.

    Unbiased for the KL when tokens are sampled from the policy, and never negative.
    """
    d = ref_logp - logp
    return torch.exp(d) - d - 1.0


def token_logprobs(logits: Tensor, targets: Tensor, temperature: float = 1.0) -> Tensor:
    """log p(target) per position from logits `[B, T, V]` and targets `[B, T]`, computed in
    float32 (float64 for a float64 model) whatever the autocast dtype.

    `temperature` must equal the sampling temperature of the engine, so that these log-probs
    are of the same distribution as the behaviour log-probs.
    """
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    picked = torch.gather(logits, -1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


@torch.no_grad()
def token_entropy(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Entropy of the next-token distribution per position (no gradient), `[B, T]`."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    lse = torch.logsumexp(logits, dim=-1)
    p = torch.softmax(logits, dim=-1)
    return lse - (p * logits).sum(-1)


def aggregate(
    per_token: Tensor,
    mask: Tensor,
    loss_agg: LossAgg,
    *,
    num_tokens: float | None = None,
    num_seqs: float | None = None,
    norm_tokens: float | None = None,
) -> Tensor:
    """Reduce per-token losses `[B, T]` to a scalar.

    - `token_mean` (DAPO's token-level loss): sum over all loss tokens of the batch divided by
      their number. Every token weighs the same, so long responses are not down-weighted.
    - `seq_mean_token_mean` (original GRPO): mean over each sequence's tokens, then mean over
      sequences. A token of a long response weighs less than one of a short response.
    - `seq_mean_token_sum_norm` (Dr. GRPO): each sequence's token sum divided by a constant
      `norm_tokens` (the generation budget), then mean over sequences. No length bias and no
      dependence on the batch's composition.

    The normalisers `num_tokens` (loss tokens) and `num_seqs` (sequences with at least one loss
    token) default to this tensor's own. Pass the whole (mini-)batch's values when `per_token`
    is one micro-batch of it: the micro-batch losses then *sum* to the whole batch's loss, so
    accumulating their gradients gives exactly the big batch's gradient.
    """
    mask = mask.to(per_token.dtype)
    # `where`, not a product: padding may hold inf/NaN (0 * inf = NaN) that must not leak in
    masked = torch.where(mask > 0, per_token * mask, torch.zeros_like(per_token))
    if loss_agg == "token_mean":
        n = mask.sum() if num_tokens is None else num_tokens
        return masked.sum() / max(float(n), 1.0)
    seq_tokens = mask.sum(dim=-1)
    n_seqs = float((seq_tokens > 0).sum()) if num_seqs is None else float(num_seqs)
    if loss_agg == "seq_mean_token_mean":
        seq_loss = masked.sum(dim=-1) / seq_tokens.clamp(min=1.0)
        return seq_loss.sum() / max(n_seqs, 1.0)
    if loss_agg == "seq_mean_token_sum_norm":
        if norm_tokens is None or norm_tokens <= 0:
            raise ValueError(
                "seq_mean_token_sum_norm needs norm_tokens > 0 (the generation budget)"
            )
        return masked.sum() / float(norm_tokens) / max(n_seqs, 1.0)
    raise ValueError(f"unknown loss_agg {loss_agg!r}; expected one of {LOSS_AGGS}")


#: The keys of `LossOutput.sums` (masked token sums) and `LossOutput.maxes` (masked maxima).
TOKEN_SUMS: tuple[str, ...] = ("clip", "ratio", "is_weight", "is_truncated", "approx_kl", "kl")
TOKEN_MAXES: tuple[str, ...] = ("is_weight", "ratio")


@dataclass
class LossOutput:
    """The loss of one (micro-)batch and the raw sums its metrics are made of.

    `sums` are sums over loss tokens and `maxes` maxima over them, so that micro-batches are
    combined by adding sums (and taking maxima) and dividing by the total `n_tokens` once.
    """

    loss: Tensor  # scalar, with gradient: pg_loss + kl_coef * kl_loss
    pg_loss: Tensor  # the aggregated policy-gradient part (detached)
    kl_loss: Tensor  # the aggregated k3 KL to the reference before `kl_coef` (detached)
    n_tokens: Tensor
    # detached 0-dim tensors, converted to floats only in `summarize` (one device sync)
    sums: dict[str, Tensor] = field(default_factory=dict)
    maxes: dict[str, Tensor] = field(default_factory=dict)


def policy_loss(
    logp: Tensor,
    logp_prox: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    logp_behav: Tensor | None = None,
    ref_logp: Tensor | None = None,
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.2,
    max_is_weight: float | None = 2.0,
    kl_coef: float = 0.0,
    loss_agg: LossAgg = "token_mean",
    num_tokens: float | None = None,
    num_seqs: float | None = None,
    norm_tokens: float | None = None,
) -> LossOutput:
    """The decoupled clipped surrogate (module docstring), plus `kl_coef * k3`, aggregated.

    Args:
        logp: current log-probs `[B, T]`, with gradient.
        logp_prox: proximal log-probs `[B, T]` (the policy at the start of the update). With
            one optimizer step on fresh tokens pass `logp.detach()`; the ratio is then 1.
        advantages: `[B]` (one per sequence) or `[B, T]`.
        mask: `[B, T]` loss mask.
        logp_behav: behaviour log-probs `[B, T]` from the engine; `None` means behaviour ==
            proximal (importance weight 1). Tokens with `logp_behav` NaN also get weight 1.
        ref_logp: reference-model log-probs `[B, T]`; required when `kl_coef > 0`.
        clip_eps_low, clip_eps_high: the clip range `[1 - low, 1 + high]` (DAPO's clip-higher
            when `high > low`).
        max_is_weight: truncation of the importance weight (TIS); `None` = not truncated.
        kl_coef: weight of the k3 KL penalty; 0 disables it.
        loss_agg, num_tokens, num_seqs, norm_tokens: see `aggregate`.
    """
    mask = mask.to(logp.dtype)
    logp_prox = logp_prox.detach()
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    advantages = advantages.to(logp.dtype).expand_as(logp)

    log_ratio = logp - logp_prox
    ratio = torch.exp(log_ratio)
    surr1 = ratio * advantages
    surr2 = torch.clamp(ratio, 1.0 - clip_eps_low, 1.0 + clip_eps_high) * advantages
    pg_tok = -torch.minimum(surr1, surr2)
    # the clipped branch is active (and the token's gradient is zero) exactly when surr2 < surr1
    clipped = (surr2 < surr1).to(logp.dtype)

    if logp_behav is not None:
        with torch.no_grad():
            d = logp_prox - logp_behav.to(logp.dtype)
            d = torch.where(torch.isnan(d), torch.zeros_like(d), d)
            w_raw = torch.exp(d)
            w = w_raw if max_is_weight is None else torch.clamp(w_raw, max=max_is_weight)
            truncated = (w_raw > w).to(logp.dtype)
        pg_tok = pg_tok * w
    else:
        w = torch.ones_like(logp)
        truncated = torch.zeros_like(logp)

    pg = aggregate(
        pg_tok, mask, loss_agg, num_tokens=num_tokens, num_seqs=num_seqs, norm_tokens=norm_tokens
    )
    loss = pg
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    kl_value = zero
    kl_sum = zero
    if kl_coef > 0.0:
        if ref_logp is None:
            raise ValueError("kl_coef > 0 needs ref_logp")
        kl_tok = kl_k3(logp, ref_logp.detach().to(logp.dtype))
        kl = aggregate(
            kl_tok,
            mask,
            loss_agg,
            num_tokens=num_tokens,
            num_seqs=num_seqs,
            norm_tokens=norm_tokens,
        )
        loss = loss + kl_coef * kl
        kl_value = kl.detach()
        kl_sum = torch.where(mask > 0, kl_tok.detach() * mask, zero).sum()

    n, sums, maxes = _token_stats(logp, logp_prox, mask, clipped, ratio, w, truncated, kl_sum)
    return LossOutput(
        loss=loss, pg_loss=pg.detach(), kl_loss=kl_value, n_tokens=n, sums=sums, maxes=maxes
    )


@torch.no_grad()
def _token_stats(
    logp: Tensor,
    logp_prox: Tensor,
    mask: Tensor,
    clipped: Tensor,
    ratio: Tensor,
    w: Tensor,
    truncated: Tensor,
    kl_sum: Tensor,
) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
    """(tokens, masked sums, masked maxima) of `policy_loss`'s per-token quantities."""
    n = mask.sum()
    approx_kl = kl_k3(logp.detach(), logp_prox)  # current vs proximal
    neg_inf = torch.full_like(logp, float("-inf"))

    def msum(x: Tensor) -> Tensor:
        return torch.where(mask > 0, x * mask, torch.zeros_like(x)).sum()

    sums = {
        "clip": msum(clipped),
        "ratio": msum(ratio.detach()),
        "is_weight": msum(w),
        "is_truncated": msum(truncated),
        "approx_kl": msum(approx_kl),
        "kl": kl_sum,
    }
    maxes = {
        "is_weight": torch.where(mask > 0, w, neg_inf).max(),
        "ratio": torch.where(mask > 0, ratio.detach(), neg_inf).max(),
    }
    return n, sums, maxes


def summarize(outputs: list[LossOutput]) -> dict[str, float]:
    """Token-weighted metrics over micro-batches: clip_frac, ratio_mean/max, is_weight_mean/max,
    is_truncated_frac, approx_kl (current vs proximal, k3), kl (k3 to the reference)."""
    if not outputs:
        return {}
    keys = sorted(TOKEN_SUMS)
    sums = torch.stack([torch.stack([o.sums[k] for k in keys]) for o in outputs]).sum(0).tolist()
    maxes = torch.stack([torch.stack([o.maxes[k] for k in TOKEN_MAXES]) for o in outputs])
    peaks = maxes.max(0).values.tolist()
    n = float(sum(o.n_tokens for o in outputs))
    d = max(n, 1.0)
    tot = dict(zip(keys, sums, strict=True))
    peak = {k: (v if v != float("-inf") else 0.0) for k, v in zip(TOKEN_MAXES, peaks, strict=True)}

    def total(key: str) -> float:
        return tot[key]

    return {
        "clip_frac": total("clip") / d,
        "ratio_mean": total("ratio") / d,
        "ratio_max": peak["ratio"],
        "is_weight_mean": total("is_weight") / d,
        "is_weight_max": peak["is_weight"],
        "is_truncated_frac": total("is_truncated") / d,
        "approx_kl": total("approx_kl") / d,
        "kl": total("kl") / d,
    }
