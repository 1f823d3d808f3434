"""GRPOTrainer on a tiny LlamaForCausalLM, the config, the schedule, and the SFT warm start."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from sortedrl.errors import ConfigError  # noqa: E402
from sortedrl.scheduling.protocol import (  # noqa: E402
    Trainer,
    TrainGroup,
    TrainSample,
    UpdateBatch,
)
from sortedrl.training.config import TrainerConfig  # noqa: E402
from sortedrl.training.sft import encode_example, supervised_warm_start  # noqa: E402
from sortedrl.training.trainer import GRPOTrainer, build_rows, lr_factor  # noqa: E402
from tests.tiny_llama import tiny_llama  # noqa: E402

PROMPT = [1, 5, 6, 7]
RESPONSES = [[10, 11, 12, 2], [13, 14, 2], [15, 16, 17, 18, 19, 2], [20, 2]]


@torch.no_grad()
def response_logprobs(model, prompt, response):
    ids = torch.tensor([prompt + response])
    logits = model(input_ids=ids).logits[0, :-1].float()
    lp = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None])[:, 0]
    return lp[len(prompt) - 1 :].tolist()


def make_batch(model, version, rewards, spans=None, finish=None, prompt_id="p0"):
    samples = []
    for i, (resp, r) in enumerate(zip(RESPONSES, rewards, strict=True)):
        samples.append(
            TrainSample(
                sample_index=i,
                n_tokens=len(resp),
                finish_reason=(finish or {}).get(i, "stop"),
                version_spans=(spans or {}).get(i, [(version, len(resp))]),
                reward=r,
                token_ids=list(resp),
                logprobs=response_logprobs(model, PROMPT, resp),
            )
        )
    group = TrainGroup(prompt_id, len(PROMPT), samples, prompt_token_ids=list(PROMPT))
    return UpdateBatch(version=version, groups=[group])


def params_copy(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# --- the trainer ---------------------------------------------------------------------------------


def test_repeated_updates_raise_the_rewarded_response():
    model = tiny_llama()
    trainer = GRPOTrainer(model, TrainerConfig(lr=3e-3, weight_decay=0.0), device="cpu")
    assert isinstance(trainer, Trainer) and trainer.virtual_time is False
    rewards = [0.0, 1.0, 0.0, 0.0]  # only response 1 is rewarded
    before = sum(response_logprobs(model, PROMPT, RESPONSES[1]))
    others_before = [sum(response_logprobs(model, PROMPT, r)) for r in RESPONSES]
    for v in range(8):
        res = trainer.update(make_batch(model, v, rewards))  # fresh tokens each time
        assert not res.skipped
        assert res.elapsed_s > 0
        assert res.stats["staleness_max"] == 0 and res.stats["prox_recomputed"] == 0
        assert res.stats["optimizer_steps"] == 1
        # ratio 1 at the single step and engine log-probs == trainer log-probs: weight 1
        assert res.stats["ratio_mean"] == pytest.approx(1.0)
        assert res.stats["is_weight_mean"] == pytest.approx(1.0, abs=1e-4)
        assert res.stats["clip_frac"] == 0.0
    after = sum(response_logprobs(model, PROMPT, RESPONSES[1]))
    assert after > before + 1.0, (before, after)
    # the unrewarded responses went down
    for k in (0, 2, 3):
        assert sum(response_logprobs(model, PROMPT, RESPONSES[k])) < others_before[k]
    # the weights handed to the engine are the model's own tensors
    sd = res.weights
    assert set(sd) == set(model.state_dict())
    assert sd["lm_head.weight"].data_ptr() == model.lm_head.weight.data_ptr()
    for key in ("loss", "grad_norm", "lr", "clip_frac", "kl", "is_weight_mean", "entropy",
                "staleness_max", "staleness_mean", "tokens", "reward_mean"):  # fmt: skip
        assert key in res.stats and math.isfinite(res.stats[key]), key
    assert res.stats["tokens"] == sum(len(r) for r in RESPONSES)
    assert res.stats["reward_mean"] == 0.25
    assert trainer.step == 8


def test_stale_tokens_need_no_extra_forward_pass_with_one_step():
    # With one optimizer step the proximal policy is the current one: reusing the training
    # pass's log-probs gives exactly the update an explicit recompute gives.
    import sortedrl.training.trainer as trainer_module

    def updated(recompute: bool):
        model = tiny_llama()
        trainer = GRPOTrainer(model, TrainerConfig(lr=1e-3))
        batch = make_batch(model, 2, [1.0, 0.0, 0.0, 1.0], spans={2: [(0, 2), (2, 4)]})
        real_build = trainer_module.build_rows

        def build_and_fill(b, cfg):
            rows, stats = real_build(b, cfg)
            if recompute:
                trainer._fill(rows, "logp_prox", trainer.model)
            return rows, stats

        trainer_module.build_rows = build_and_fill
        try:
            res = trainer.update(batch)
        finally:
            trainer_module.build_rows = real_build
        assert res.stats["prox_recomputed"] == 0.0
        return [p.detach().clone() for p in model.parameters()]

    for a, b in zip(updated(False), updated(True), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_stale_tokens_are_weighted_by_the_truncated_importance_ratio():
    model = tiny_llama()
    trainer = GRPOTrainer(model, TrainerConfig(lr=1e-3))
    # response 2 (6 tokens): 2 from version 0, 4 from version 2; the batch trains version 2
    batch = make_batch(model, 2, [1.0, 0.0, 0.0, 1.0], spans={2: [(0, 2), (2, 4)]})
    # pretend the engine's policy for the stale tokens was less likely to pick them
    batch.groups[0].samples[2].logprobs[:2] = [
        x - 1.5 for x in batch.groups[0].samples[2].logprobs[:2]
    ]
    res = trainer.update(batch)
    assert not res.skipped
    s = res.stats
    assert s["prox_recomputed"] == 0.0  # one optimizer step: the training pass is proximal
    assert s["staleness_max"] == 2.0
    # staleness 2 on 2 of the 15 response tokens: mean 4 / 15
    assert s["staleness_mean"] == pytest.approx(4 / 15)
    assert s["stale_token_frac"] == pytest.approx(2 / 15)
    # those two tokens have weight exp(1.5) = 4.48 -> truncated at 2; the 13 others weight 1
    assert s["is_weight_max"] == pytest.approx(2.0)
    assert s["is_truncated_frac"] == pytest.approx(2 / 15)
    assert s["is_weight_mean"] == pytest.approx((13 + 2 * 2) / 15, abs=1e-4)


def test_future_version_is_an_error():
    model = tiny_llama()
    trainer = GRPOTrainer(model)
    batch = make_batch(model, 1, [1.0, 0.0, 0.0, 0.0], spans={0: [(2, 4)]})
    with pytest.raises(ValueError, match="version 2 > batch 1"):
        trainer.update(batch)


def test_bad_samples_are_named():
    model = tiny_llama()
    batch = make_batch(model, 0, [1.0, 0.0, 0.0, 0.0], spans={1: [(0, 1)]})
    with pytest.raises(ValueError, match="group 'p0' sample 1: version_spans cover 1"):
        build_rows(batch, TrainerConfig())
    batch = make_batch(model, 0, [1.0, 0.0, 0.0, 0.0])
    batch.groups[0].samples[3].logprobs = [0.0]
    with pytest.raises(ValueError, match="sample 3: 1 logprobs but n_tokens is 2"):
        build_rows(batch, TrainerConfig())
    batch.groups[0].prompt_token_ids = None
    with pytest.raises(ValueError, match="prompt_token_ids"):
        build_rows(batch, TrainerConfig())


@pytest.mark.parametrize("policy", ["keep", "mask", "zero_advantage"])
def test_truncated_response_switch(policy):
    model = tiny_llama()
    # rewards [1, 0, 1, 0], response 1 cut at the length cap.
    # advantages over the whole group (truncated member included): mean 0.5, unbiased std
    # sqrt(4 * 0.25 / 3) = 0.57735 -> +-0.5 / 0.57735 = +-0.866025
    batch = make_batch(model, 0, [1.0, 0.0, 1.0, 0.0], finish={1: "length"})
    rows, stats = build_rows(batch, TrainerConfig(truncated=policy))
    a = 0.5 / (math.sqrt(1 / 3) + 1e-6)
    assert stats["truncated"] == 1
    trunc = rows[1]
    if policy == "keep":
        assert trunc.advantage == pytest.approx(-a) and trunc.n_loss_tokens == 3
        assert stats["loss_tokens"] == 15
    elif policy == "mask":  # DAPO overlong filtering: no loss, not in the normalisers
        assert trunc.advantage == pytest.approx(-a) and trunc.n_loss_tokens == 0
        assert stats["loss_tokens"] == 12 and stats["masked_samples"] == 1
    else:  # advantage 0, tokens still counted
        assert trunc.advantage == 0.0 and trunc.n_loss_tokens == 3
        assert stats["loss_tokens"] == 15
    assert rows[0].advantage == pytest.approx(a)
    # the whole update runs under each policy
    res = GRPOTrainer(model, TrainerConfig(truncated=policy, lr=1e-3)).update(batch)
    assert not res.skipped


def test_several_steps_per_batch():
    model = tiny_llama()
    trainer = GRPOTrainer(model, TrainerConfig(lr=1e-3, ppo_epochs=2, mini_batches=2))
    res = trainer.update(make_batch(model, 0, [1.0, 0.0, 0.0, 0.5]))
    assert res.stats["optimizer_steps"] == 4 and trainer.step == 4
    assert res.stats["prox_recomputed"] == 1.0  # more than one step: ratios move off 1
    assert res.stats["ratio_max"] > 1.0


def test_micro_batch_budget_gives_the_same_update():
    base = tiny_llama()
    batch = make_batch(base, 0, [1.0, 0.0, 0.0, 0.5])
    results = []
    for budget in (10_000, 10):
        # float64: Adam's first step is about lr * sign(g), so float32 rounding in tiny
        # gradient entries would show up in the weights
        model = tiny_llama().double()
        trainer = GRPOTrainer(model, TrainerConfig(lr=1e-2, max_tokens_per_micro_batch=budget))
        res = trainer.update(batch)
        results.append((res.stats["micro_batches"], params_copy(model)))
    (n1, p1), (n2, p2) = results
    assert n1 == 1 and n2 == 4
    for k in p1:
        assert torch.allclose(p1[k], p2[k], atol=1e-12), k


def test_non_finite_loss_skips_the_update():
    model = tiny_llama()
    trainer = GRPOTrainer(model, TrainerConfig(lr=1e-2))
    before = params_copy(model)
    res = trainer.update(make_batch(model, 0, [1.0, math.nan, 0.0, 0.0]))  # NaN advantages
    assert res.skipped
    assert res.stats["skipped_nonfinite"] == 1 and res.stats["skipped_updates_total"] == 1
    assert trainer.step == 0
    for k, v in params_copy(model).items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())
    # the next good batch trains normally
    res = trainer.update(make_batch(model, 0, [1.0, 0.0, 0.0, 0.0]))
    assert not res.skipped and trainer.step == 1
    assert res.stats["skipped_steps_total"] == 1


def test_non_finite_gradient_skips_the_update():
    model = tiny_llama()
    trainer = GRPOTrainer(model, TrainerConfig(lr=1e-2))
    before = params_copy(model)
    handle = model.model.norm.weight.register_hook(lambda g: g * math.inf)
    res = trainer.update(make_batch(model, 0, [1.0, 0.0, 0.0, 0.0]))
    handle.remove()
    assert res.skipped and math.isfinite(res.stats["pg_loss"]) is False  # no step taken
    for k, v in params_copy(model).items():
        assert torch.equal(v, before[k]), k


def test_kl_to_reference():
    model = tiny_llama()
    trainer = GRPOTrainer(model, TrainerConfig(lr=1e-2, kl_coef=0.5))
    assert trainer.ref_model is not None and trainer.ref_model is not model
    res = trainer.update(make_batch(model, 0, [1.0, 0.0, 0.0, 0.0]))
    assert res.stats["kl"] == pytest.approx(0.0, abs=1e-10)  # reference == policy at first
    res = trainer.update(make_batch(model, 1, [1.0, 0.0, 0.0, 0.0]))
    assert res.stats["kl"] > 0
    # without a KL term no reference is kept, even if one is given
    assert GRPOTrainer(tiny_llama(), TrainerConfig(), ref_model=tiny_llama()).ref_model is None


def test_bf16_autocast_runs_on_cpu():
    model = tiny_llama()
    trainer = GRPOTrainer(model, TrainerConfig(lr=1e-3, dtype="bfloat16"))
    assert trainer.amp_dtype == torch.bfloat16
    res = trainer.update(make_batch(model, 0, [1.0, 0.0, 0.0, 0.0]))
    assert not res.skipped
    assert next(model.parameters()).dtype == torch.float32  # master weights stay fp32
    assert GRPOTrainer(tiny_llama()).amp_dtype is None  # auto on CPU: fp32


def test_state_dict_round_trip():
    cfg = TrainerConfig(lr=1e-3, warmup_steps=2, total_steps=10, mini_batches=2)
    model = tiny_llama()
    trainer = GRPOTrainer(model, cfg)
    trainer.update(make_batch(model, 0, [1.0, 0.0, 0.0, 0.0]))
    state = trainer.state_dict()
    other = GRPOTrainer(tiny_llama(), cfg)
    other.load_state_dict(state)
    assert other.step == trainer.step == 2
    assert other.optimizer.param_groups[0]["lr"] == trainer.optimizer.param_groups[0]["lr"]
    assert other.scheduler.last_epoch == trainer.scheduler.last_epoch
    s1 = trainer.optimizer.state_dict()["state"]
    s2 = other.optimizer.state_dict()["state"]
    assert set(s1) == set(s2)
    assert all(torch.equal(s1[k]["exp_avg"], s2[k]["exp_avg"]) for k in s1)
    assert torch.equal(trainer._gen.get_state(), other._gen.get_state())


# --- schedule and config -----------------------------------------------------------------------


def test_lr_schedule():
    # warm-up 2 steps: (s + 1) / 2 -> 0.5, 1.0; then cosine from 1 to 0.1 over steps 2..10:
    # step 6 is half way: 0.1 + 0.9 * (1 + cos(pi / 2)) / 2 = 0.55; step 10 and after: 0.1
    assert lr_factor(0, 2, 10, 0.1) == pytest.approx(0.5)
    assert lr_factor(1, 2, 10, 0.1) == pytest.approx(1.0)
    assert lr_factor(2, 2, 10, 0.1) == pytest.approx(1.0)
    assert lr_factor(6, 2, 10, 0.1) == pytest.approx(0.55)
    assert lr_factor(10, 2, 10, 0.1) == pytest.approx(0.1)
    assert lr_factor(50, 2, 10, 0.1) == pytest.approx(0.1)
    assert lr_factor(50, 0, None, 0.1) == 1.0  # constant without total_steps
    # the trainer applies it per optimizer step
    model = tiny_llama()
    trainer = GRPOTrainer(model, TrainerConfig(lr=1.0e-3, warmup_steps=2, total_steps=10))
    lrs = [trainer.update(make_batch(model, v, [1.0, 0, 0, 0])).stats["lr"] for v in range(3)]
    assert lrs == pytest.approx([0.5e-3, 1.0e-3, 1.0e-3])


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"trainer\.lr"):
        TrainerConfig.from_dict({"lr": -1})
    with pytest.raises(ConfigError, match=r"trainer\.loss_agg"):
        TrainerConfig.from_dict({"loss_agg": "mean"})
    with pytest.raises(ConfigError, match=r"trainer\.learning_rate"):
        TrainerConfig.from_dict({"learning_rate": 1e-3})  # unknown field
    with pytest.raises(ConfigError, match="norm_tokens"):
        TrainerConfig.from_dict({"loss_agg": "seq_mean_token_sum_norm"})
    with pytest.raises(ConfigError, match="total_steps"):
        TrainerConfig.from_dict({"warmup_steps": 5, "total_steps": 3})
    cfg = TrainerConfig.from_dict({"loss_agg": "seq_mean_token_sum_norm", "norm_tokens": 64})
    assert cfg.norm_tokens == 64 and cfg.clip_eps_high == 0.28
    with pytest.raises(ConfigError, match=r"trainer\.max_tokens_per_micro_batch"):
        GRPOTrainer(tiny_llama(), {"max_tokens_per_micro_batch": 0})


# --- supervised warm start -----------------------------------------------------------------------


class CharTokenizer:
    """ids: 0 pad, 1 bos, 2 eos, then 'a'.. as 3.."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def __call__(self, text, add_special_tokens=True):
        ids = [3 + ord(c) - ord("a") for c in text]
        if add_special_tokens:
            ids = [self.bos_token_id, *ids]
        return {"input_ids": ids}


def test_encode_example():
    # prompt "ab" -> [bos, 3, 4]; response "c" -> [5, eos]
    assert encode_example(CharTokenizer(), "ab", "c") == ([1, 3, 4], [5, 2])


def test_supervised_warm_start_learns_the_responses():
    model = tiny_llama()
    tok = CharTokenizer()
    # the response is a function of the prompt: reverse it
    examples = [("abc", "cba"), ("bcd", "dcb"), ("ace", "eca"), ("fgh", "hgf")]
    losses = supervised_warm_start(model, tok, examples, steps=60, batch_size=4, lr=1e-2, seed=0)
    assert len(losses) == 60
    assert losses[-1] < 0.5 * losses[0]
    # the prompt is masked: the response tokens (eos included) are what is learned
    p, r = encode_example(tok, "abc", "cba")
    assert sum(response_logprobs(model, p, r)) / len(r) > -1.0
