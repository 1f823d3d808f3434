"""From an update batch to training rows: one `Row` per response, with its loss mask, its
tokens' staleness and its group-relative advantage, plus statistics of what went in."""

from __future__ import annotations

import torch
from torch import Tensor

from sortedrl.scheduling.protocol import TrainGroup, TrainSample, UpdateBatch
from sortedrl.training.config import TrainerConfig
from sortedrl.training.loss import group_advantages
from sortedrl.training.packing import Row


def expand_versions(version_spans: list[tuple[int, int]], n_tokens: int, where: str) -> Tensor:
    """Per-token policy versions from run-length spans `[(version, count), ...]`."""
    if sum(c for _, c in version_spans) != n_tokens:
        raise ValueError(
            f"{where}: version_spans cover {sum(c for _, c in version_spans)} tokens, "
            f"n_tokens is {n_tokens}"
        )
    if any(c < 0 for _, c in version_spans):
        raise ValueError(f"{where}: negative count in version_spans")
    if not version_spans:
        return torch.zeros(0, dtype=torch.long)
    versions = torch.tensor([v for v, _ in version_spans], dtype=torch.long)
    counts = torch.tensor([c for _, c in version_spans], dtype=torch.long)
    return torch.repeat_interleave(versions, counts)


def build_rows(batch: UpdateBatch, cfg: TrainerConfig) -> tuple[list[Row], dict[str, float]]:
    """Rows of `batch` and statistics of what went in (rewards, lengths, staleness).

    Advantages are computed over each whole group, truncated members included with their
    reward; `cfg.truncated` then decides whether a truncated response is trained (`keep`),
    left out of the loss (`mask`), or trained with advantage 0 (`zero_advantage`: only the KL
    term acts on it, and its tokens count in the normalisers). Zero-length responses take part
    in their group's advantage but have no token to train.
    """
    rows: list[Row] = []
    rewards_all: list[float] = []
    stale_sum = 0
    stale_max = 0
    stale_tokens = 0
    n_tokens = 0
    n_truncated = 0
    n_masked = 0
    n_empty = 0
    zero_adv_groups = 0
    adv_abs: list[float] = []
    for g in batch.groups:
        where_g = f"group {g.prompt_id!r}"
        if not g.samples:
            raise ValueError(f"{where_g}: no samples")
        if g.prompt_token_ids is None:
            raise ValueError(f"{where_g}: prompt_token_ids is None (the trainer needs token ids)")
        if len(g.prompt_token_ids) < 1:
            raise ValueError(f"{where_g}: empty prompt (prepend BOS)")
        rewards = [float(s.reward) for s in g.samples]
        rewards_all.extend(rewards)
        if max(rewards) == min(rewards):
            zero_adv_groups += 1
        adv = group_advantages(torch.tensor([rewards]), cfg.normalize_std, cfg.adv_eps)[0].tolist()
        for s, a in zip(g.samples, adv, strict=True):
            row = _sample_row(batch.version, g, s, a, cfg)
            n_tokens += s.n_tokens
            if s.finish_reason == "length":
                n_truncated += 1
            if row is None:
                n_empty += 1
                continue
            if row.n_loss_tokens == 0:
                n_masked += 1
            stale_sum += int(row.staleness.sum())
            stale_max = max(stale_max, int(row.staleness.max()))
            stale_tokens += int((row.staleness > 0).sum())
            adv_abs.append(abs(row.advantage))
            rows.append(row)
    n_samples = len(rewards_all)
    stats = {
        "groups": float(len(batch.groups)),
        "samples": float(n_samples),
        "tokens": float(n_tokens),
        "loss_tokens": float(sum(r.n_loss_tokens for r in rows)),
        "response_len_mean": n_tokens / max(n_samples, 1),
        "reward_mean": sum(rewards_all) / max(n_samples, 1),
        "adv_abs_mean": sum(adv_abs) / max(len(adv_abs), 1),
        "zero_adv_group_frac": zero_adv_groups / max(len(batch.groups), 1),
        "truncated": float(n_truncated),
        "masked_samples": float(n_masked),
        "empty_samples": float(n_empty),
        "staleness_max": float(stale_max),
        "staleness_mean": stale_sum / max(n_tokens, 1),
        "stale_token_frac": stale_tokens / max(n_tokens, 1),
    }
    return rows, stats


def _sample_row(
    version: int, g: TrainGroup, s: TrainSample, adv: float, cfg: TrainerConfig
) -> Row | None:
    where = f"group {g.prompt_id!r} sample {s.sample_index}"
    if s.finish_reason not in ("stop", "length"):
        raise ValueError(f"{where}: finish_reason {s.finish_reason!r} cannot be trained")
    if s.token_ids is None:
        raise ValueError(f"{where}: token_ids is None (the trainer needs token ids)")
    if len(s.token_ids) != s.n_tokens:
        raise ValueError(f"{where}: {len(s.token_ids)} token_ids but n_tokens is {s.n_tokens}")
    if s.logprobs is not None and len(s.logprobs) != s.n_tokens:
        raise ValueError(f"{where}: {len(s.logprobs)} logprobs but n_tokens is {s.n_tokens}")
    versions = expand_versions(s.version_spans, s.n_tokens, where)
    staleness = version - versions
    if s.n_tokens and int(staleness.min()) < 0:
        raise ValueError(f"{where}: token from version {int(versions.max())} > batch {version}")
    if s.n_tokens == 0:
        return None
    mask = torch.ones(s.n_tokens)
    if s.finish_reason == "length":
        if cfg.truncated == "mask":
            mask.zero_()
        elif cfg.truncated == "zero_advantage":
            adv = 0.0
    behav = None
    if cfg.behav_is_correction and s.logprobs is not None:
        behav = torch.tensor(s.logprobs, dtype=torch.float32)
    return Row(
        input_ids=list(g.prompt_token_ids or []) + list(s.token_ids),
        prompt_len=len(g.prompt_token_ids or []),
        advantage=float(adv),
        mask=mask,
        staleness=staleness,
        logp_behav=behav,
    )
