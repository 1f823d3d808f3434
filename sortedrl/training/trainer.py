"""GRPO trainer on PyTorch / transformers causal LMs: implements the `Trainer` protocol.

One `update(batch)`:

1. builds one `Row` per response: prompt + response ids, the loss mask, the behaviour log-probs
   from the engine, each token's staleness (`batch.version` minus the version that generated
   it, expanded from the run-length `version_spans`) and the group-relative advantage;
2. recomputes the proximal log-probs without gradient when the update takes more than one
   optimizer step. With one step the proximal policy *is* the current one, so the training
   forward pass's own log-probs (detached) are the proximal ones, stale tokens or not (their
   staleness enters through the behaviour/proximal importance weight), and no extra forward
   pass is spent;
3. runs `ppo_epochs x mini_batches` optimizer steps; each step accumulates gradients over
   length-sorted micro-batches packed to `max_tokens_per_micro_batch` tokens, clips the
   gradient norm and steps AdamW and the warm-up + cosine schedule. A non-finite loss or
   gradient skips that step (no parameter change, counted in the stats).

Data parallelism goes through one object, `dp` (`sortedrl.training.parallel`): it says
which rows of a mini-batch this process trains, keeps the processes' passes in step, reduces
the statistics and gathers the weights. The default is one process, for which every one of
those is the identity, so the code below reads as the single-process algorithm.
"""

from __future__ import annotations

import copy
import math
import time
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from sortedrl.scheduling.protocol import UpdateBatch, UpdateResult
from sortedrl.training.config import TrainerConfig
from sortedrl.training.loss import (
    LossOutput,
    policy_loss,
    summarize,
    token_entropy,
    token_logprobs,
)
from sortedrl.training.packing import MicroBatch, Row, collate, plan_micro_batches
from sortedrl.training.parallel import DataParallel
from sortedrl.training.rows import build_rows


def lr_factor(step: int, warmup_steps: int, total_steps: int | None, min_lr_ratio: float) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based).

    Linear warm-up `(step + 1) / warmup_steps` for the first `warmup_steps` steps, then cosine
    decay from 1 to `min_lr_ratio` reached at `total_steps` and held after; constant 1 after the
    warm-up when `total_steps` is None.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if total_steps is None:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class GRPOTrainer:
    """Clipped-surrogate GRPO (decoupled for stale tokens) on a causal LM; see module docs.

    `model` is trained in place (fp32 master weights; autocast per `config.dtype`). With
    `kl_coef > 0` a frozen reference is kept: `ref_model`, or a copy of `model` as it is now.
    `temperature` is the engine's sampling temperature: log-probs are recomputed at it, so a
    fresh token's importance weight is 1. `seed` seeds the mini-batch split (the run's seed).
    `dp` makes this one rank of a data-parallel group (`sortedrl.training.distributed`); every
    rank then gets the whole batch, the same `seed`, and a `model` already sharded.
    """

    virtual_time = False

    def __init__(
        self,
        model: nn.Module,
        config: TrainerConfig | dict[str, Any] | None = None,
        ref_model: nn.Module | None = None,
        device: str | torch.device = "cpu",
        *,
        temperature: float = 1.0,
        seed: int = 0,
        dp: DataParallel | None = None,
    ) -> None:
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if config is None:
            config = TrainerConfig()
        elif isinstance(config, dict):
            config = TrainerConfig.from_dict(config)
        self.config = config
        self.dp = dp if dp is not None else DataParallel()
        self.temperature = float(temperature)
        self.device = torch.device(device)
        self.model = model.to(self.device)
        if config.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable()
        self.ref_model: nn.Module | None = None
        if config.kl_coef > 0:
            ref = ref_model if ref_model is not None else copy.deepcopy(model)
            self.ref_model = ref.to(self.device).eval().requires_grad_(False)
        self.amp_dtype = self._resolve_dtype()
        pad = getattr(getattr(model, "config", None), "pad_token_id", None)
        self.pad_id = int(pad) if isinstance(pad, int) else 0

        params = [p for p in model.parameters() if p.requires_grad]
        self._params = params
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        self.optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": config.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=config.lr,
            betas=config.betas,
            eps=config.adam_eps,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: lr_factor(s, config.warmup_steps, config.total_steps, config.min_lr_ratio),
        )
        self._gen = torch.Generator().manual_seed(seed)
        self.step = 0  # optimizer steps taken
        self.updates = 0  # update() calls that changed the policy
        self.skipped_steps = 0  # optimizer steps skipped for a non-finite loss or gradient
        self.skipped_updates = 0  # update() calls that left the policy unchanged

    # --- the Trainer protocol ------------------------------------------------------------------

    def update(self, batch: UpdateBatch) -> UpdateResult:
        t0 = time.perf_counter()
        cfg = self.config
        rows, stats = build_rows(batch, cfg)
        n_steps = cfg.ppo_epochs * cfg.mini_batches
        need_prox = n_steps > 1  # see the module docstring, point 2
        stats["prox_recomputed"] = float(need_prox)
        if need_prox:
            self._fill(rows, "logp_prox", self.model)
        if self.ref_model is not None:
            self._fill(rows, "ref_logp", self.ref_model)

        outputs: list[LossOutput] = []
        losses, pg_losses, kl_losses, grad_norms, lrs = [], [], [], [], []
        entropy_sum = entropy_n = 0.0
        padded = real = micro = 0
        taken = skipped = skipped_nonfinite = 0
        for epoch in range(cfg.ppo_epochs):
            for chunk in self._split(len(rows)):
                part = [rows[i] for i in chunk]
                if sum(r.n_loss_tokens for r in part) == 0:
                    skipped += 1  # nothing to learn from (all masked): not a failure
                    continue
                res = self._step(part, want_entropy=(epoch == 0 and taken + skipped == 0))
                padded += res["padded"]
                real += res["real"]
                micro += res["micro"]
                entropy_sum += res["entropy_sum"]
                entropy_n += res["entropy_n"]
                if not res["ok"]:
                    skipped += 1
                    skipped_nonfinite += 1
                    continue
                taken += 1
                outputs.extend(res["outputs"])
                losses.append(res["loss"])
                pg_losses.append(res["pg_loss"])
                kl_losses.append(res["kl_loss"])
                grad_norms.append(res["grad_norm"])
                lrs.append(res["lr"])
        self.skipped_steps += skipped_nonfinite
        if taken:
            self.updates += 1
        else:
            self.skipped_updates += 1
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

        stats.update(summarize(outputs))

        def mean(xs: list[float]) -> float:
            return sum(xs) / len(xs) if xs else float("nan")

        stats.update(
            {
                "loss": mean(losses),
                "pg_loss": mean(pg_losses),
                "kl": mean(kl_losses) if self.ref_model is not None else 0.0,
                "grad_norm": mean(grad_norms),
                "grad_norm_max": max(grad_norms) if grad_norms else float("nan"),
                "lr": lrs[-1] if lrs else self.optimizer.param_groups[0]["lr"],
                "entropy": entropy_sum / entropy_n if entropy_n else float("nan"),
                "optimizer_steps": float(taken),
                "skipped_steps": float(skipped),
                "skipped_nonfinite": float(skipped_nonfinite),
                "skipped_steps_total": float(self.skipped_steps),
                "skipped_updates_total": float(self.skipped_updates),
                "step": float(self.step),
                "micro_batches": float(micro),
                "padding_frac": 1.0 - real / padded if padded else 0.0,
            }
        )
        elapsed = time.perf_counter() - t0
        stats["elapsed_s"] = elapsed
        return UpdateResult(
            elapsed_s=elapsed,
            weights=self.dp.full_state_dict(self.model),
            stats={k: float(v) for k, v in stats.items()},
            skipped=taken == 0,
        )

    # --- checkpoints ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Optimizer, schedule and counters (the model's weights are saved separately)."""
        return {"optimizer": self.optimizer.state_dict(), **self.progress_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.load_progress_state(state)

    def save_checkpoint(self, folder: str) -> dict[str, Any]:
        """The state for the checkpoint's `trainer.pt` (`CheckpointedTrainer`); nothing is
        written under `folder`."""
        return self.state_dict()

    def load_checkpoint(self, folder: str | None, state: dict[str, Any] | None) -> None:
        if state is None:
            raise ValueError(
                "its trainer state was written with cluster.backend=ray, and this run uses "
                "cluster.backend=local; resume with the backend that wrote it"
            )
        self.load_state_dict(state)

    def progress_state(self) -> dict[str, Any]:
        """The schedule, the counters and the mini-batch RNG: the same on every rank."""
        return {
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "updates": self.updates,
            "skipped_steps": self.skipped_steps,
            "skipped_updates": self.skipped_updates,
            "generator": self._gen.get_state(),
        }

    def load_progress_state(self, state: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        self.updates = int(state.get("updates", 0))
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.skipped_updates = int(state.get("skipped_updates", 0))
        if "generator" in state:
            self._gen.set_state(state["generator"])

    # --- internals -----------------------------------------------------------------------------

    def _resolve_dtype(self) -> torch.dtype | None:
        """The autocast dtype, or None for plain fp32."""
        want = self.config.dtype
        if want == "float32":
            return None
        if want == "bfloat16":
            return torch.bfloat16
        if self.device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None

    def _autocast(self) -> AbstractContextManager[Any]:
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _logits(self, model: nn.Module, mb: MicroBatch) -> Tensor:
        with self._autocast():
            out = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, use_cache=False)
        logits = out.logits if hasattr(out, "logits") else out[0]
        return logits[:, :-1]

    def _split(self, n: int) -> list[list[int]]:
        """Row indices of each mini-batch: one in order, or a seeded shuffle cut in parts."""
        k = self.config.mini_batches
        if k == 1:
            return [list(range(n))]
        perm = torch.randperm(n, generator=self._gen).tolist()
        return [perm[i::k] for i in range(k) if perm[i::k]]

    @torch.no_grad()
    def _fill(self, rows: list[Row], attr: str, model: nn.Module) -> None:
        """Set `rows[i].<attr>` to `model`'s log-probs of each response (no gradient). Each
        rank computes its share of the rows; `dp` then hands every rank the others' values."""
        mine = self.dp.share(rows)
        plan = plan_micro_batches(
            [rows[i].length for i in mine], self.config.max_tokens_per_micro_batch
        )
        for k in range(self.dp.max_over_ranks(len(plan))):
            if k >= len(plan):
                self._idle_pass(model, backward=False)
                continue
            idx = [mine[j] for j in plan[k]]
            mb = collate(rows, idx, self.pad_id, self.device)
            logp = token_logprobs(self._logits(model, mb), mb.targets, self.temperature)
            for i, v in zip(idx, mb.scatter(logp), strict=True):
                setattr(rows[i], attr, v)
        self.dp.gather_rows(rows, mine, attr)

    def _idle_pass(self, model: nn.Module, backward: bool) -> None:
        """A forward (and backward) of one padding row that adds nothing to any gradient. A rank
        with fewer micro-batches than another runs these, so that every rank makes the same
        collective calls (a sharded model gathers its weights in each pass)."""
        ids = torch.full((1, 2), self.pad_id, dtype=torch.long, device=self.device)
        with torch.set_grad_enabled(backward), self._autocast():
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
        if backward:
            logits = out.logits if hasattr(out, "logits") else out[0]
            (logits.float().sum() * 0.0).backward()

    def _step(self, rows: list[Row], want_entropy: bool) -> dict[str, Any]:
        """One optimizer step over the mini-batch `rows`, of which this rank trains its share,
        accumulated over micro-batches."""
        cfg = self.config
        # The whole mini-batch's normalisers, on every rank: the ranks' losses then add up to
        # the mini-batch's loss, and their gradients (summed by the group) to its gradient.
        num_tokens = sum(r.n_loss_tokens for r in rows)
        num_seqs = sum(1 for r in rows if r.n_loss_tokens > 0)
        mine = self.dp.share(rows)
        plan = plan_micro_batches([rows[i].length for i in mine], cfg.max_tokens_per_micro_batch)
        self.optimizer.zero_grad(set_to_none=True)
        outputs: list[LossOutput] = []
        padded = real = 0
        ent_sum = torch.zeros((), device=self.device)
        ent_n = 0.0
        ok = True
        for k in range(self.dp.max_over_ranks(len(plan))):
            if k >= len(plan) or not ok:
                if self.dp.world == 1:
                    break
                self._idle_pass(self.model, backward=True)
                continue
            idx = [mine[j] for j in plan[k]]
            mb = collate(rows, idx, self.pad_id, self.device)
            padded += mb.padded_tokens
            real += sum(rows[i].length for i in idx)
            out, e_sum, e_n = self._micro_loss(mb, num_tokens, num_seqs, want_entropy)
            ent_sum = ent_sum + e_sum
            ent_n += e_n
            if not bool(torch.isfinite(out.loss)):
                ok = False
                if self.dp.world == 1:
                    break
                # the other ranks reduce gradients in this backward: join it (the NaN it
                # spreads is harmless, the step is skipped everywhere)
                (out.loss * 0.0).backward()
                continue
            out.loss.backward()
            out.loss = out.loss.detach()  # drop the graph reference
            outputs.append(out)
        ok = self.dp.all_true(ok)  # a non-finite loss on any rank skips the step on all
        grad_norm = float("nan")
        if ok:
            max_norm = cfg.max_grad_norm if cfg.max_grad_norm is not None else float("inf")
            grad_norm = self.dp.clip_grad_norm(self._params, max_norm)
            ok = math.isfinite(grad_norm)
        lr = self.optimizer.param_groups[0]["lr"]
        if ok:
            self.optimizer.step()
            self.scheduler.step()
            self.step += 1
        self.optimizer.zero_grad(set_to_none=True)
        return self.dp.reduce_step(
            {
                "ok": ok,
                "outputs": outputs,
                "loss": float(sum(o.loss.detach() for o in outputs)) if outputs else float("nan"),
                "pg_loss": float(sum(o.pg_loss for o in outputs)) if outputs else float("nan"),
                "kl_loss": float(sum(o.kl_loss for o in outputs)) if outputs else float("nan"),
                "grad_norm": grad_norm,
                "lr": lr,
                "padded": padded,
                "real": real,
                "micro": len(plan),
                "entropy_sum": float(ent_sum),
                "entropy_n": ent_n,
            }
        )

    def _micro_loss(
        self, mb: MicroBatch, num_tokens: float, num_seqs: float, want_entropy: bool
    ) -> tuple[LossOutput, Tensor, float]:
        """The loss of one micro-batch (with its graph), and its entropy sum and token count."""
        cfg = self.config
        logits = self._logits(self.model, mb)
        logp = token_logprobs(logits, mb.targets, self.temperature)
        ent_sum = torch.zeros((), device=self.device)
        ent_n = 0.0
        if want_entropy and cfg.compute_entropy:
            ent = token_entropy(logits, self.temperature)
            ent_sum = torch.where(mb.mask > 0, ent, torch.zeros_like(ent)).sum()
            ent_n = float(mb.mask.sum())
        del logits
        prox = mb.logp_prox if mb.logp_prox is not None else logp.detach()
        out = policy_loss(
            logp,
            prox,
            mb.advantages,
            mb.mask,
            logp_behav=mb.logp_behav,
            ref_logp=mb.ref_logp,
            clip_eps_low=cfg.clip_eps_low,
            clip_eps_high=cfg.clip_eps_high,
            max_is_weight=cfg.max_is_weight,
            kl_coef=cfg.kl_coef,
            loss_agg=cfg.loss_agg,
            num_tokens=num_tokens,
            num_seqs=num_seqs,
            norm_tokens=cfg.norm_tokens,
        )
        return out, ent_sum, ent_n
