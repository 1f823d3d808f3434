"""Whether prompts and responses fit the model's context, checked before any work is done.

A model has ``max_position_embeddings`` positions (GPT-2's ``n_positions``); a prompt of ``P``
tokens with responses of up to ``max_new_tokens`` needs ``P + max_new_tokens`` of them. Past
that, a model with learned positions (GPT-2) fails with an index error and one with rotary
positions (Llama, Qwen2) goes on where it was never trained. So `max_new_tokens` alone must
leave room for a prompt, and each prompt that does not fit is an error naming its file and
line, or, with ``task.long_prompts=drop`` (as TRL's ``max_prompt_length`` keeps prompts in
bounds), is dropped and counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sortedrl.errors import ConfigError
from sortedrl.tasks.base import Problem


def context_positions(model: Any) -> int | None:
    """The model's positions (`max_position_embeddings`), or None when it declares none."""
    n = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return int(n) if isinstance(n, int) and n > 0 else None


def check_room(positions: int | None, max_new_tokens: int, setting: str) -> None:
    """`max_new_tokens` must leave room for a prompt; `setting` names it in the message, as
    the user gave it (``"scheduler.max_new_tokens="``, ``"--max-new-tokens "``)."""
    if positions is not None and max_new_tokens >= positions:
        raise ConfigError(
            f"{setting}{max_new_tokens} does not fit the model's {positions} positions "
            f"(max_position_embeddings in its config.json): responses would run past the "
            f"context; use at most {positions - 1} minus the longest prompt"
        )


def fit_prompts(
    problems: Sequence[Problem],
    prompt_len: Any,
    positions: int | None,
    max_new_tokens: int,
    *,
    drop: bool,
    setting: str,
) -> tuple[list[Problem], int]:
    """(the problems that fit, how many were dropped); `prompt_len(problem)` is its tokens.

    A problem that does not fit is an error naming its source (file and line) unless `drop`.
    """
    if positions is None:
        return list(problems), 0
    kept: list[Problem] = []
    for p in problems:
        n = prompt_len(p)
        if n + max_new_tokens <= positions:
            kept.append(p)
            continue
        if not drop:
            where = p.meta.get("source") if isinstance(p.meta, dict) else None
            raise ConfigError(
                f"{where or f'prompt {p.prompt_id!r}'}: the prompt's {n} tokens and "
                f"{setting}{max_new_tokens} do not fit the model's {positions} positions "
                f"(max_position_embeddings); shorten the prompt, lower {setting.rstrip('= ')}, "
                "or set task.long_prompts=drop to leave such prompts out"
            )
    return kept, len(problems) - len(kept)
