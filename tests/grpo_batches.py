"""The update batch the data-parallel tests train on (`test_fsdp.py`, `test_ray_trainers.py`).

Group "a": one long response and three short; group "b": short ones, one cut at the length
cap (masked when `truncated="mask"`). Row lengths (prompt + response): a = 20, 6, 7, 6 and
b = 5, 4, 6, 5, so with two ranks the longest row sits alone on one of them and the two shares
differ in tokens and in micro-batches.
"""

from __future__ import annotations

import math

import torch

from sortedrl.scheduling.protocol import TrainGroup, TrainSample, UpdateBatch
from tests.tiny_llama import tiny_llama

GROUPS = {
    "a": ([1, 5, 6, 7], [[10 + i % 20 for i in range(16)], [11, 2], [12, 13, 2], [14, 2]]),
    "b": ([1, 8], [[15, 16, 2], [17, 2], [18, 19, 20, 21], [22, 23, 2]]),
}
REWARDS = {"a": [1.0, 0.0, 0.5, 0.0], "b": [0.0, 1.0, 0.0, 1.0]}
TRUNCATED = ("b", 2)


@torch.no_grad()
def behaviour_logprobs(model, prompt: list[int], response: list[int]) -> list[float]:
    ids = torch.tensor([prompt + response])
    logits = model(input_ids=ids).logits[0, :-1].float()
    lp = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None])[:, 0]
    return lp[len(prompt) - 1 :].tolist()


def make_batch(version: int, poisoned: bool = False) -> UpdateBatch:
    """The test batch at policy `version`; its tokens were sampled at version 0 by the initial
    model (stale from the second update on). `poisoned` adds a one-sample group with an
    infinite reward: its advantage is NaN, so the rank that trains it has a NaN loss."""
    model = tiny_llama(0)
    groups = []
    for name, (prompt, responses) in GROUPS.items():
        samples = [
            TrainSample(
                sample_index=i,
                n_tokens=len(resp),
                finish_reason="length" if (name, i) == TRUNCATED else "stop",
                version_spans=[(0, len(resp))],
                reward=REWARDS[name][i],
                token_ids=list(resp),
                logprobs=[
                    lp - 0.01 * j for j, lp in enumerate(behaviour_logprobs(model, prompt, resp))
                ],
            )
            for i, resp in enumerate(responses)
        ]
        groups.append(TrainGroup(name, len(prompt), samples, prompt_token_ids=list(prompt)))
    if poisoned:
        bad = TrainSample(0, 2, "stop", [(0, 2)], reward=math.inf, token_ids=[24, 2])
        groups.append(TrainGroup("poison", 2, [bad], prompt_token_ids=[1, 9]))
    return UpdateBatch(version=version, groups=groups)
