"""Trainer settings."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from sortedrl.errors import ConfigError, format_validation_error

TruncatedPolicy = Literal["keep", "mask", "zero_advantage"]


class TrainerConfig(BaseModel):
    """Settings of `GRPOTrainer`. Defaults follow DAPO's loss (token-level mean, clip-higher,
    no KL) with GRPO's std-normalised advantages and one on-policy optimizer step per update."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # --- optimizer and schedule (steps are optimizer steps) ---
    lr: float = Field(1e-6, gt=0, description="peak learning rate of AdamW")
    weight_decay: float = Field(
        0.01, ge=0, description="AdamW decoupled weight decay (not on biases and norm weights)"
    )
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas")
    adam_eps: float = Field(1e-8, gt=0, description="AdamW epsilon")
    max_grad_norm: float | None = Field(
        1.0, gt=0, description="clip the global gradient norm to this; null: no clipping"
    )
    warmup_steps: int = Field(0, ge=0, description="linear warm-up steps from lr/warmup to lr")
    total_steps: int | None = Field(
        None,
        ge=1,
        description="cosine decay from lr to lr*min_lr_ratio ends here; null: constant lr",
    )
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="final lr as a fraction of lr")

    # --- steps per update batch ---
    ppo_epochs: int = Field(1, ge=1, description="passes over each update batch")
    mini_batches: int = Field(
        1, ge=1, description="optimizer steps per pass (the batch is split into this many)"
    )

    # --- objective ---
    loss_agg: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"] = Field(
        "token_mean",
        description="token_mean (DAPO), seq_mean_token_mean (GRPO), seq_mean_token_sum_norm "
        "(Dr. GRPO; needs norm_tokens)",
    )
    norm_tokens: int | None = Field(
        None, ge=1, description="the constant of seq_mean_token_sum_norm: the generation budget"
    )
    normalize_std: bool = Field(
        True, description="divide advantages by the group's reward std (off in Dr. GRPO)"
    )
    adv_eps: float = Field(1e-6, gt=0, description="added to the group std before dividing")
    clip_eps_low: float = Field(0.2, ge=0, lt=1, description="ratio clipped below at 1 - this")
    clip_eps_high: float = Field(
        0.28, ge=0, description="ratio clipped above at 1 + this (DAPO clip-higher: 0.28)"
    )
    behav_is_correction: bool = Field(
        True,
        description="weight tokens by exp(logp_prox - logp_behav) (decoupled PPO); "
        "off: behaviour log-probs are ignored",
    )
    max_is_weight: float | None = Field(
        2.0, ge=1, description="truncate the importance weight at this (TIS); null: no truncation"
    )
    kl_coef: float = Field(
        0.0, ge=0, description="k3 KL penalty to a frozen reference model; 0: no reference kept"
    )
    truncated: TruncatedPolicy = Field(
        "keep",
        description="responses cut at the length cap: keep (train with their reward), mask "
        "(no loss; DAPO overlong filtering), zero_advantage (advantage 0, tokens still counted)",
    )

    # --- execution ---
    max_tokens_per_micro_batch: int = Field(
        8192, ge=1, description="padded tokens (rows x longest) per forward/backward"
    )
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="autocast dtype: auto = bf16 on a GPU that supports it, else fp32"
    )
    compute_entropy: bool = Field(True, description="report the policy's mean token entropy")
    gradient_checkpointing: bool = Field(False, description="trade compute for activation memory")

    @model_validator(mode="after")
    def _check(self) -> TrainerConfig:
        if self.loss_agg == "seq_mean_token_sum_norm" and self.norm_tokens is None:
            raise ValueError(
                "norm_tokens: required when loss_agg is seq_mean_token_sum_norm "
                "(set it to the generation budget, max_new_tokens)"
            )
        if self.total_steps is not None and self.total_steps < self.warmup_steps:
            raise ValueError("total_steps: must be >= warmup_steps")
        return self

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, where: str = "trainer") -> TrainerConfig:
        """Validate `data`; errors become one `ConfigError` naming each bad field."""
        try:
            return cls.model_validate(data or {})
        except ValidationError as e:
            raise ConfigError("invalid config: " + format_validation_error(e, where)) from None
