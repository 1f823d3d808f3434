"""TRL's `GRPOConfig` names and sortedrl's settings for them: one table, read by the config's
error for a TRL name and kept in step with the docs' "Coming from TRL" table by a test.

Each entry: TRL's field -> (sortedrl's setting, how the meaning differs).
"""

from __future__ import annotations

TRL_NAMES: dict[str, tuple[str, str]] = {
    "num_generations": ("scheduler.group_size", "same: responses per prompt"),
    "per_device_train_batch_size": (
        "scheduler.update_batch",
        "TRL counts completions per optimizer step; update_batch counts prompts (complete "
        "groups of scheduler.group_size) per update",
    ),
    "gradient_accumulation_steps": (
        "scheduler.update_batch",
        "an update trains update_batch complete groups at once",
    ),
    "generation_batch_size": (
        "scheduler.rollout_batch",
        "prompts the engine keeps open (sorted); sync admits update_batch and waits",
    ),
    "steps_per_generation": ("trainer.mini_batches", "optimizer steps per update"),
    "max_completion_length": ("scheduler.max_new_tokens", "same"),
    "max_prompt_length": (
        "task.long_prompts",
        "prompts too long for the model's context with max_new_tokens are an error naming "
        "their file and line, or dropped and counted with task.long_prompts=drop",
    ),
    "learning_rate": ("trainer.lr", "same"),
    "beta": ("trainer.kl_coef", "same k3 estimator against a frozen reference"),
    "epsilon": ("trainer.clip_eps_low", "same"),
    "epsilon_high": ("trainer.clip_eps_high", "same; sortedrl's default is DAPO's 0.28"),
    "loss_type": (
        "trainer.loss_agg",
        "dapo = token_mean, grpo = seq_mean_token_mean, dr_grpo = seq_mean_token_sum_norm",
    ),
    "scale_rewards": ("trainer.normalize_std", "group = true, none = false"),
    "temperature": ("rollout.temperature", "same: one temperature for sampling and log-probs"),
    "top_p": ("rollout.top_p", "same"),
    "num_iterations": ("trainer.ppo_epochs", "same: passes over each update batch"),
    "mask_truncated_completions": ("trainer.truncated", "true = trainer.truncated=mask"),
    "reward_funcs": ("task.reward_fns", "'package.module:function' names, called per response"),
    "reward_weights": ("task.reward_weights", "same"),
    "max_steps": (
        "max_updates",
        "TRL counts optimizer steps; an update is trainer.mini_batches x trainer.ppo_epochs",
    ),
    "max_grad_norm": ("trainer.max_grad_norm", "same"),
    "weight_decay": ("trainer.weight_decay", "same"),
    "warmup_steps": ("trainer.warmup_steps", "same"),
    "use_vllm": ("rollout.engine", "true = rollout.engine=vllm"),
}


def trl_hint(name: str) -> str | None:
    """The pointer for TRL's `name`, or None when it is not one of TRL's."""
    if name not in TRL_NAMES:
        return None
    ours, note = TRL_NAMES[name]
    return f"{name} is TRL's name; sortedrl's setting is {ours} ({note})"
