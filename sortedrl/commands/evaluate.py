"""Evaluation of a model on task problems with the transformers engine (greedy at temperature 0)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sortedrl.scheduling.protocol import Request
from sortedrl.tasks.base import Problem
from sortedrl.training.sft import encode_example


def prompt_token_ids(tokenizer: Any, prompt: str, chat_template: bool = True) -> list[int]:
    """The prompt's token ids: through the tokenizer's chat template when it has one (a chat
    model) and `chat_template` is true, else as the warm start sees them (BOS prepended)."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
        if isinstance(ids, dict) or hasattr(ids, "keys"):  # a BatchEncoding
            ids = ids["input_ids"]
        return [int(i) for i in ids]
    ids, _ = encode_example(tokenizer, prompt, "")
    return ids


def decode(tokenizer: Any, token_ids: Sequence[int] | None) -> str:
    return tokenizer.decode(list(token_ids or []), skip_special_tokens=True)


def evaluate(
    model: Any,
    tokenizer: Any,
    task: Any,
    problems: Sequence[Problem],
    samples: int = 1,
    temperature: float = 0.0,
    capacity: int = 64,
    max_new_tokens: int = 128,
    seed: int = 0,
    device: str = "cpu",
    chat_template: bool = True,
) -> dict[str, float]:
    """Generate `samples` responses per problem and score them with `task.score`.

    Returns pass@1 (= accuracy: the mean share of correct responses, mean@k over samples),
    reward_mean, format_ok and response_len_mean (tokens). The model is left in the training
    mode it was in.
    """
    from sortedrl.engines.transformers_engine import TransformersEngine

    was_training = bool(getattr(model, "training", False))
    engine = TransformersEngine(
        model,
        tokenizer,
        capacity=capacity,
        temperature=temperature,  # <= 0: greedy
        top_p=1.0,
        seed=seed,
        device=device,
    )
    by_id: dict[str, tuple[Problem, int]] = {}
    requests = []
    for i, p in enumerate(problems):
        ids = prompt_token_ids(tokenizer, p.prompt, chat_template)
        for k in range(samples):
            rid = f"eval/{i}/{k}"
            by_id[rid] = (p, k)
            requests.append(
                Request(
                    request_id=rid,
                    prompt_id=p.prompt_id,
                    sample_index=k,
                    attempt=0,
                    prompt_len=len(ids),
                    max_new_tokens=max_new_tokens,
                    prompt_token_ids=ids,
                )
            )
    rewards: list[float] = []
    correct: list[float] = []
    fmt: list[float] = []
    lengths: list[int] = []
    try:
        engine.submit(requests)
        while engine.num_unfinished():
            for g in engine.step().finished:
                problem, _ = by_id[g.request_id]
                s = task.score(problem, decode(tokenizer, g.token_ids))
                rewards.append(float(s.reward))
                correct.append(1.0 if s.correct else 0.0)
                fmt.append(1.0 if s.format_ok else 0.0)
                lengths.append(int(g.n_tokens))
    finally:
        if was_training:
            model.train()
    n = max(1, len(rewards))
    acc = sum(correct) / n
    return {
        "pass@1": acc,
        "accuracy": acc,
        "reward_mean": sum(rewards) / n,
        "format_ok": sum(fmt) / n,
        "response_len_mean": sum(lengths) / n,
        "problems": len(problems),
        "samples": samples,
    }
