"""The RL objective on small tensors, values worked out by hand."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from sortedrl.training.loss import (  # noqa: E402
    aggregate,
    group_advantages,
    kl_k3,
    policy_loss,
    summarize,
    token_entropy,
    token_logprobs,
)


def t(x, **kw):
    return torch.tensor(x, dtype=torch.float64, **kw)


# --- advantages -------------------------------------------------------------------------------


def test_advantages_without_std():
    # group 1: mean (1+0+0+1)/4 = 0.5 -> [0.5, -0.5, -0.5, 0.5]; group 2: all equal -> 0
    adv = group_advantages(t([[1, 0, 0, 1], [2, 2, 2, 2]]), normalize_std=False)
    assert adv.tolist() == [[0.5, -0.5, -0.5, 0.5], [0.0, 0.0, 0.0, 0.0]]


def test_advantages_with_std():
    # group 1: unbiased std = sqrt((4 * 0.25) / 3) = sqrt(1/3) = 0.57735
    #          0.5 / (0.57735 + 1e-6) = 0.866024
    # group 2: [3, 1]: mean 2, std = sqrt((1 + 1) / 1) = 1.41421 -> +-1 / 1.41421 = +-0.707106
    # group 3: all equal: 0 / (0 + eps) = 0, not NaN
    adv = group_advantages(t([[1, 0, 0, 1], [3, 1, 2, 2], [5, 5, 5, 5]]), normalize_std=True)
    s = math.sqrt(1 / 3) + 1e-6
    assert adv[0].tolist() == pytest.approx([0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s], rel=1e-6)
    # [3,1,2,2]: mean 2, deviations [1,-1,0,0], std = sqrt(2/3) = 0.816497
    s2 = math.sqrt(2 / 3) + 1e-6
    assert adv[1].tolist() == pytest.approx([1 / s2, -1 / s2, 0.0, 0.0], rel=1e-6)
    assert adv[2].tolist() == [0.0, 0.0, 0.0, 0.0]


def test_advantages_group_of_one_is_zero():
    assert group_advantages(t([[3.0]]), normalize_std=True).tolist() == [[0.0]]


# --- the clipped surrogate ---------------------------------------------------------------------

# (advantage, ratio, expected loss, expected d loss / d logp, clipped) with eps_low = eps_high
# = 0.2, i.e. the clip range [0.8, 1.2]. loss = -min(r*A, clip(r)*A); where the unclipped
# branch is active the gradient w.r.t. logp is -r*A (d r / d logp = r), else 0.
CASES = [
    (+1.0, 1.1, -1.1, -1.1, False),  # inside the range
    (+1.0, 1.5, -1.2, 0.0, True),  # A > 0 above 1 + eps: min(1.5, 1.2) = 1.2, clipped
    (+1.0, 0.5, -0.5, -0.5, False),  # A > 0 below 1 - eps: min(0.5, 0.8) = 0.5, not clipped
    (-1.0, 0.5, 0.8, 0.0, True),  # A < 0 below 1 - eps: min(-0.5, -0.8) = -0.8, clipped
    (-1.0, 1.5, 1.5, 1.5, False),  # A < 0 above 1 + eps: min(-1.5, -1.2) = -1.5, not clipped
    (-2.0, 0.9, 1.8, 1.8, False),  # inside, |A| = 2: -(0.9 * -2) = 1.8
]


@pytest.mark.parametrize("adv,ratio,loss,grad,clipped", CASES)
def test_clipped_surrogate_single_token(adv, ratio, loss, grad, clipped):
    prox = t([[-1.0]])
    logp = (prox + math.log(ratio)).requires_grad_(True)
    out = policy_loss(logp, prox, t([adv]), t([[1.0]]), clip_eps_low=0.2, clip_eps_high=0.2)
    out.loss.backward()
    assert float(out.loss.detach()) == pytest.approx(loss, abs=1e-9)
    assert float(logp.grad) == pytest.approx(grad, abs=1e-9)
    assert summarize([out])["clip_frac"] == (1.0 if clipped else 0.0)
    assert summarize([out])["ratio_mean"] == pytest.approx(ratio)


def test_clipped_surrogate_batch_token_mean():
    # the six cases above as one batch: token mean = (-1.1 - 1.2 - 0.5 + 0.8 + 1.5 + 1.8) / 6
    prox = t([[-1.0]] * len(CASES))
    logp = prox + t([[math.log(c[1])] for c in CASES])
    out = policy_loss(logp, prox, t([c[0] for c in CASES]), torch.ones_like(prox))
    assert float(out.loss.detach()) == pytest.approx(1.3 / 6)
    assert summarize([out])["clip_frac"] == pytest.approx(2 / 6)


def test_clip_higher_is_asymmetric():
    # DAPO clip-higher: range [1 - 0.2, 1 + 0.28] = [0.8, 1.28]. A = +1:
    # ratio 1.25 is inside -> loss -1.25; ratio 1.3 is clipped -> loss -1.28
    prox = t([[0.0], [0.0]])
    logp = t([[math.log(1.25)], [math.log(1.3)]]).requires_grad_(True)
    out = policy_loss(
        logp, prox, t([1.0, 1.0]), t([[1.0], [1.0]]), clip_eps_low=0.2, clip_eps_high=0.28,
        loss_agg="seq_mean_token_mean",
    )  # fmt: skip
    out.loss.backward()
    # mean of the two sequences: (-1.25 - 1.28) / 2
    assert float(out.loss.detach()) == pytest.approx((-1.25 - 1.28) / 2)
    # d/dlogp of -(r * A) / 2 = -r / 2 for the first, 0 for the clipped second
    assert logp.grad.flatten().tolist() == pytest.approx([-1.25 / 2, 0.0])
    # the lower side still clips at 0.8: A = -1, ratio 0.75 -> -min(-0.75, -0.8) = 0.8
    out = policy_loss(t([[math.log(0.75)]]), t([[0.0]]), t([-1.0]), t([[1.0]]), clip_eps_high=0.28)
    assert float(out.loss.detach()) == pytest.approx(0.8)


# --- aggregation -------------------------------------------------------------------------------

# row 0: losses [1, 2, 3], all carry loss; row 1: [4, 5, inf] with the inf masked (padding)
PER_TOKEN = [[1.0, 2.0, 3.0], [4.0, 5.0, math.inf]]
MASK = [[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]]


def test_aggregate_token_mean():
    # (1 + 2 + 3 + 4 + 5) / 5 tokens = 3; the masked inf does not leak
    assert float(aggregate(t(PER_TOKEN), t(MASK), "token_mean")) == pytest.approx(3.0)


def test_aggregate_seq_mean_token_mean():
    # row means 6/3 = 2 and 9/2 = 4.5, mean over the two sequences: 3.25
    assert float(aggregate(t(PER_TOKEN), t(MASK), "seq_mean_token_mean")) == pytest.approx(3.25)


def test_aggregate_seq_mean_token_sum_norm():
    # row sums 6 and 9, each / 10 (the constant), mean over 2 sequences: (0.6 + 0.9) / 2 = 0.75
    out = aggregate(t(PER_TOKEN), t(MASK), "seq_mean_token_sum_norm", norm_tokens=10)
    assert float(out) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="norm_tokens"):
        aggregate(t(PER_TOKEN), t(MASK), "seq_mean_token_sum_norm")


def test_aggregate_fully_masked_row_is_not_a_sequence():
    # a third row with no loss tokens does not count in the number of sequences
    per_token = t([*PER_TOKEN, [7.0, 7.0, 7.0]])
    mask = t([*MASK, [0.0, 0.0, 0.0]])
    assert float(aggregate(per_token, mask, "seq_mean_token_mean")) == pytest.approx(3.25)
    assert float(aggregate(per_token, mask, "token_mean")) == pytest.approx(3.0)


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_aggregate_parts_sum_to_whole_with_global_normalisers(agg):
    whole = aggregate(t(PER_TOKEN), t(MASK), agg, norm_tokens=10)
    kw = {"num_tokens": 5, "num_seqs": 2, "norm_tokens": 10}
    parts = aggregate(t(PER_TOKEN[:1]), t(MASK[:1]), agg, **kw) + aggregate(
        t(PER_TOKEN[1:]), t(MASK[1:]), agg, **kw
    )
    assert float(parts) == pytest.approx(float(whole))


# --- decoupled correction for stale tokens -------------------------------------------------------


def test_importance_weight_and_truncation():
    # two tokens, A = +1, logp == prox (ratio 1):
    #   token 0: prox - behav = -1 - (-1.5) = 0.5 -> w = e^0.5 = 1.648721
    #   token 1: prox - behav = -1 - (-2.0) = 1.0 -> w = e^1 = 2.718 -> truncated to 2
    # loss per token = -w * 1 * 1; token mean = -(1.648721 + 2) / 2 = -1.824361
    prox = t([[-1.0, -1.0]])
    logp = prox.clone().requires_grad_(True)
    behav = t([[-1.5, -2.0]])
    out = policy_loss(logp, prox, t([1.0]), t([[1.0, 1.0]]), logp_behav=behav, max_is_weight=2.0)
    out.loss.backward()
    e = math.exp(0.5)
    assert float(out.loss.detach()) == pytest.approx(-(e + 2.0) / 2)
    # gradient: d/dlogp of -w * r * A / 2 = -w / 2 (the weight carries no gradient)
    assert logp.grad.flatten().tolist() == pytest.approx([-e / 2, -1.0])
    m = summarize([out])
    assert m["is_weight_mean"] == pytest.approx((e + 2.0) / 2)
    assert m["is_weight_max"] == pytest.approx(2.0)
    assert m["is_truncated_frac"] == pytest.approx(0.5)
    # without truncation token 1 keeps e^1
    out = policy_loss(logp, prox, t([1.0]), t([[1.0, 1.0]]), logp_behav=behav, max_is_weight=None)
    assert float(out.loss.detach()) == pytest.approx(-(e + math.e) / 2)


def test_ratio_is_clipped_against_the_proximal_policy_not_the_behaviour_one():
    # logp = -0.9, prox = -1.0, behav = -1.5, A = +1, clip [0.8, 1.2]
    # ratio vs prox = e^0.1 = 1.105171 (inside the range); weight = e^0.5 = 1.648721
    # loss = -1.648721 * 1.105171 = -1.822119 (against behav the ratio e^0.6 = 1.82 would clip)
    out = policy_loss(
        t([[-0.9]]), t([[-1.0]]), t([1.0]), t([[1.0]]), logp_behav=t([[-1.5]]),
        clip_eps_low=0.2, clip_eps_high=0.2,
    )  # fmt: skip
    assert float(out.loss.detach()) == pytest.approx(-math.exp(0.5) * math.exp(0.1))
    assert summarize([out])["clip_frac"] == 0.0


def test_unknown_behaviour_logprob_gets_weight_one():
    # behav NaN (not reported) -> weight 1: loss = -(1 * 1) with ratio 1, A = 1
    out = policy_loss(t([[-1.0]]), t([[-1.0]]), t([1.0]), t([[1.0]]), logp_behav=t([[math.nan]]))
    assert float(out.loss.detach()) == pytest.approx(-1.0)


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_fresh_tokens_reduce_to_plain_grpo(agg):
    """Staleness 0 and one optimizer step: behaviour == proximal == current in value, so the
    decoupled loss equals the ordinary GRPO/PPO loss with old = behaviour, gradient included."""
    g = torch.Generator().manual_seed(0)
    logp0 = -torch.rand((3, 5), generator=g, dtype=torch.float64) * 3
    mask = t([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    adv = t([0.7, -1.2, 0.4])

    def plain_grpo(logp, old):  # the textbook form, written out independently
        r = torch.exp(logp - old)
        a = adv[:, None]
        tok = -torch.minimum(r * a, torch.clamp(r, 0.8, 1.28) * a)
        return aggregate(tok, mask, agg, norm_tokens=8)

    for shift in (0.0, 0.3):  # 0: first step (ratio 1); 0.3: a changed policy, same old
        logp_a = (logp0 + shift * torch.sin(logp0)).requires_grad_(True)
        logp_b = logp_a.detach().clone().requires_grad_(True)
        behav = logp0.clone()
        prox = logp0.clone()  # fresh: recomputing before the update gives the behaviour values
        out = policy_loss(
            logp_a, prox, adv, mask, logp_behav=behav, clip_eps_low=0.2, clip_eps_high=0.28,
            loss_agg=agg, norm_tokens=8,
        )  # fmt: skip
        ref = plain_grpo(logp_b, behav)
        out.loss.backward()
        ref.backward()
        assert float(out.loss.detach()) == pytest.approx(float(ref.detach()), abs=1e-12)
        assert torch.allclose(logp_a.grad, logp_b.grad, atol=1e-12)
        assert summarize([out])["is_weight_mean"] == pytest.approx(1.0)


# --- KL ----------------------------------------------------------------------------------------


def test_kl_k3_values():
    # logp = -1, ref = -1.5: d = ref - logp = -0.5 -> e^-0.5 + 0.5 - 1 = 0.106531
    # logp = -1, ref = -0.5: d = +0.5 -> e^0.5 - 0.5 - 1 = 0.148721;  equal -> 0
    k = kl_k3(t([-1.0, -1.0, -1.0]), t([-1.5, -0.5, -1.0]))
    assert k.tolist() == pytest.approx([math.exp(-0.5) - 0.5, math.exp(0.5) - 1.5, 0.0])


def test_kl_penalty_in_the_loss():
    # A = 0 so only the KL acts; kl_coef 0.1, token mean of the two k3 values above:
    # 0.1 * (0.106531 + 0.148721) / 2 = 0.0127626
    logp = t([[-1.0, -1.0]]).requires_grad_(True)
    ref = t([[-1.5, -0.5]])
    out = policy_loss(logp, logp.detach(), t([0.0]), t([[1.0, 1.0]]), ref_logp=ref, kl_coef=0.1)
    k1, k2 = math.exp(-0.5) - 0.5, math.exp(0.5) - 1.5
    assert float(out.loss.detach()) == pytest.approx(0.1 * (k1 + k2) / 2)
    assert float(out.kl_loss) == pytest.approx((k1 + k2) / 2)
    assert summarize([out])["kl"] == pytest.approx((k1 + k2) / 2)
    out.loss.backward()
    # d k3 / d logp = -e^d + 1: token 0: 1 - e^-0.5 = 0.393469; token 1: 1 - e^0.5 = -0.648721
    assert logp.grad.flatten().tolist() == pytest.approx(
        [0.1 * (1 - math.exp(-0.5)) / 2, 0.1 * (1 - math.exp(0.5)) / 2]
    )
    with pytest.raises(ValueError, match="ref_logp"):
        policy_loss(logp, logp.detach(), t([0.0]), t([[1.0, 1.0]]), kl_coef=0.1)


# --- helpers -----------------------------------------------------------------------------------


def test_token_logprobs_and_entropy():
    # uniform logits over 4 tokens: log p = -log 4, entropy = log 4
    logits = torch.zeros((1, 2, 4))
    lp = token_logprobs(logits, torch.tensor([[0, 3]]))
    assert lp.flatten().tolist() == pytest.approx([-math.log(4)] * 2)
    assert token_entropy(logits).flatten().tolist() == pytest.approx([math.log(4)] * 2)
    # temperature 2 on logits [2, 0]: softmax([1, 0]) -> p0 = e / (e + 1)
    lp = token_logprobs(torch.tensor([[[2.0, 0.0]]]), torch.tensor([[0]]), temperature=2.0)
    assert float(lp) == pytest.approx(math.log(math.e / (math.e + 1)))
    # bf16 logits are upcast
    assert token_logprobs(logits.bfloat16(), torch.tensor([[0, 3]])).dtype == torch.float32


def test_summarize_combines_micro_batches_token_weighted():
    # micro-batch 1: one token with weight 2 (truncated); micro-batch 2: three with weight 1
    a = policy_loss(t([[0.0]]), t([[0.0]]), t([1.0]), t([[1.0]]), logp_behav=t([[-3.0]]))
    b = policy_loss(
        t([[0.0] * 3]), t([[0.0] * 3]), t([1.0]), t([[1.0] * 3]), logp_behav=t([[0.0] * 3])
    )
    m = summarize([a, b])
    assert m["is_weight_mean"] == pytest.approx((2 + 3) / 4)
    assert m["is_weight_max"] == pytest.approx(2.0)
    assert m["is_truncated_frac"] == pytest.approx(1 / 4)
