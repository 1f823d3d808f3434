"""Evaluation of a model on task problems with the transformers engine (greedy at temperature 0).

Responses are scored through the run's `Scorer` (`sortedrl.tasks.scoring.make_scorer`): the same
sandbox, limits and reward function as training.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from sortedrl.errors import ConfigError
from sortedrl.scheduling.protocol import Generation, Request
from sortedrl.tasks.base import Problem
from sortedrl.tasks.reward_report import FailureConsole, RewardReport
from sortedrl.tasks.scoring import Scorer, score_generations
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


def problem_token_ids(tokenizer: Any, problem: Problem, chat_template: bool = True) -> list[int]:
    """A problem's prompt token ids: its text (`prompt_token_ids`), or, for a conversational
    prompt (``meta["messages"]``), its messages through the tokenizer's chat template."""
    messages = problem.meta.get("messages") if isinstance(problem.meta, dict) else None
    if messages is None:
        return prompt_token_ids(tokenizer, problem.prompt, chat_template)
    where = problem.meta.get("source") or problem.prompt_id
    if not chat_template:
        raise ConfigError(
            f"{where}: the prompt is a list of messages, which only a chat template renders; "
            "task.chat_template=false leaves none"
        )
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            f"{where}: the prompt is a list of messages, and the model's tokenizer has no chat "
            "template to render them (tokenizer_config.json: chat_template)"
        )
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # a BatchEncoding
        ids = ids["input_ids"]
    return [int(i) for i in ids]


def evaluate(
    model: Any,
    tokenizer: Any,
    scorer: Scorer,
    problems: Sequence[Problem],
    *,
    samples: int = 1,
    temperature: float = 0.0,
    top_p: float = 1.0,
    capacity: int = 64,
    max_new_tokens: int = 128,
    seed: int = 0,
    device: str = "cpu",
    engine_name: str = "transformers",
    chat_template: bool = True,
    console: FailureConsole | None = None,
    generate: Callable[[list[Request], float, float, int], list[Generation]] | None = None,
) -> dict[str, Any]:
    """Generate `samples` responses per problem and score them with `scorer`.

    Returns pass@1 (= accuracy: the mean share of correct responses, mean@k over samples),
    reward_mean, format_ok and response_len_mean (tokens); with your own reward functions, each
    one's ``rewards/<fn>/mean`` and its failures, ``reward_failures: {fn: {kind: count}}``
    (the first messages go to `console`, a fresh one by default). The model is left in the
    training mode it was in. `engine_name`: "transformers", or "vllm" (a vLLM engine started for this
    evaluation and shut down after it). `generate(requests, temperature, top_p, seed)`, when
    given, generates elsewhere (the Ray replicas, `ReplicaPool.evaluate`) and `model` is not
    used.
    """
    by_id: dict[str, tuple[Problem, int]] = {}
    requests = []
    for i, p in enumerate(problems):
        ids = problem_token_ids(tokenizer, p, chat_template)
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
    report = RewardReport()
    console = console if console is not None else FailureConsole()

    def take(finished: list[Generation]) -> None:
        items = [(by_id[g.request_id][0], g.token_ids) for g in finished]
        for g, s in zip(finished, score_generations(scorer, tokenizer, items), strict=True):
            report.add(s)
            console.show(s, f"evaluation, {g.request_id}")
            rewards.append(float(s.reward))
            correct.append(1.0 if s.correct else 0.0)
            fmt.append(1.0 if s.format_ok else 0.0)
            lengths.append(int(g.n_tokens))

    if generate is not None:
        take(generate(requests, temperature, top_p, seed))
    else:
        was_training = bool(getattr(model, "training", False))
        kwargs = dict(capacity=capacity, temperature=temperature, top_p=top_p, seed=seed)
        engine = local_eval_engine(engine_name, model, tokenizer, device, kwargs)
        try:
            engine.submit(requests)
            while engine.num_unfinished():
                take(engine.step().finished)
        finally:
            if was_training:
                model.train()
            engine.close()
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
        **{k: v for k, v in report.metrics().items() if k.startswith("rewards/")},
        **({"reward_failures": report.failure_counts()} if report.names else {}),
    }


def local_eval_engine(
    engine_name: str, model: Any, tokenizer: Any, device: str, kwargs: dict[str, Any]
) -> Any:
    """The engine an evaluation in this process runs on (over `model` itself, no copy)."""
    if engine_name == "vllm":
        from sortedrl.engines.vllm_engine import VLLMEngine

        return VLLMEngine(model, tokenizer, device=device, **kwargs)  # <= 0: greedy
    if engine_name == "transformers":
        from sortedrl.engines.transformers_engine import TransformersEngine

        return TransformersEngine(model, tokenizer, device=device, **kwargs)
    raise ValueError(f"evaluate: unknown engine {engine_name!r}")


def evaluate_run(
    cfg: Any,
    model: Any,
    tokenizer: Any,
    scorer: Scorer,
    problems: Sequence[Problem],
    console: FailureConsole | None = None,
    generate: Callable[[list[Request], float, float, int], list[Generation]] | None = None,
) -> dict[str, Any]:
    """A training run's evaluation: `eval.samples` at `eval.temperature` (greedy by default),
    plus `eval.sampled` samples at the rollout's temperature and top_p (`sampled_accuracy`).
    `generate`: see `evaluate`."""

    def score(samples: int, temperature: float, top_p: float) -> dict[str, Any]:
        return evaluate(
            model,
            tokenizer,
            scorer,
            problems,
            samples=samples,
            temperature=temperature,
            top_p=top_p,
            capacity=cfg.rollout.capacity,
            max_new_tokens=cfg.scheduler_config().max_new_tokens,
            seed=cfg.seed,
            device=cfg.model.device,
            chat_template=cfg.task.chat_template,
            console=console,
            generate=generate,
        )

    result: dict[str, Any] = score(cfg.eval.samples, cfg.eval.temperature, 1.0)
    if cfg.eval.sampled:
        sampled = score(cfg.eval.sampled, cfg.rollout.temperature, cfg.rollout.top_p)
        result["sampled_accuracy"] = sampled["accuracy"]
        result["sampled_reward_mean"] = sampled["reward_mean"]
    return result
