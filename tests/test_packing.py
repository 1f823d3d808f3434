"""Length-sorted micro-batches: the plan, the padded layout, and gradient equivalence."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from sortedrl.training.loss import policy_loss, token_logprobs  # noqa: E402
from sortedrl.training.packing import Row, collate, plan_micro_batches  # noqa: E402
from tests.tiny_llama import tiny_llama  # noqa: E402


def row(prompt, response, adv=1.0, mask=None, staleness=None, behav=None):
    n = len(response)
    return Row(
        input_ids=list(prompt) + list(response),
        prompt_len=len(prompt),
        advantage=adv,
        mask=torch.tensor(mask if mask is not None else [1.0] * n),
        staleness=torch.tensor(staleness if staleness is not None else [0] * n),
        logp_behav=None if behav is None else torch.tensor(behav, dtype=torch.float32),
    )


def test_plan_sorts_and_packs_to_budget():
    # lengths [5, 3, 8, 3, 10], budget 12 tokens (rows x longest):
    #   sorted: #1 (3), #3 (3), #0 (5), #2 (8), #4 (10)
    #   [#1, #3]: 2 x 3 = 6; adding #0 would be 3 x 5 = 15 > 12 -> new micro-batch
    #   [#0]: adding #2 would be 2 x 8 = 16 > 12;  [#2];  [#4]
    assert plan_micro_batches([5, 3, 8, 3, 10], 12) == [[1, 3], [0], [2], [4]]
    # a huge budget puts everything in one micro-batch, still sorted short to long, as long as
    # the longest is at most twice the shortest
    assert plan_micro_batches([5, 3, 6, 3, 4], 10_000) == [[1, 3, 4, 0, 2]]
    # past that, a new micro-batch starts: padded 3 * 5 + 2 * 10 = 35 tokens, not 5 * 10 = 50
    assert plan_micro_batches([5, 3, 8, 3, 10], 10_000) == [[1, 3, 0], [2, 4]]
    # a sequence longer than the budget runs alone
    assert plan_micro_batches([10, 2, 2], 4) == [[1, 2], [0]]
    assert plan_micro_batches([], 4) == []
    with pytest.raises(ValueError):
        plan_micro_batches([1], 0)


def test_plan_respects_budget_and_covers_every_index():
    import random

    rnd = random.Random(1)
    for _ in range(50):
        lengths = [rnd.randint(1, 60) for _ in range(rnd.randint(1, 30))]
        budget = rnd.randint(1, 200)
        plan = plan_micro_batches(lengths, budget)
        assert sorted(i for mb in plan for i in mb) == list(range(len(lengths)))
        for mb in plan:
            longest = max(lengths[i] for i in mb)
            assert len(mb) == 1 or len(mb) * longest <= budget
            assert longest <= 2 * min(lengths[i] for i in mb)


def test_collate_layout():
    # prompt [1, 2], response [3, 4, 5]: targets = ids[1:] = [2, 3, 4, 5]; response tokens are
    # targets 1..3, i.e. positions prompt_len - 1 = 1 .. 3 of the [b, L - 1] layout
    rows = [
        row([1, 2], [3, 4, 5], adv=0.5, staleness=[0, 1, 2], behav=[-1.0, -2.0, -3.0]),
        row([7], [8], adv=-1.0, mask=[0.0]),
    ]
    mb = collate(rows, [0, 1], pad_id=0)
    assert mb.input_ids.tolist() == [[1, 2, 3, 4, 5], [7, 8, 0, 0, 0]]
    assert mb.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert mb.targets.tolist() == [[2, 3, 4, 5], [8, 0, 0, 0]]
    assert mb.mask.tolist() == [[0, 1, 1, 1], [0, 0, 0, 0]]
    assert mb.response.tolist() == [[False, True, True, True], [True, False, False, False]]
    assert mb.staleness.tolist() == [[0, 0, 1, 2], [0, 0, 0, 0]]
    assert mb.advantages.tolist() == [0.5, -1.0]
    assert mb.logp_behav[0, 1:].tolist() == [-1.0, -2.0, -3.0]
    assert torch.isnan(mb.logp_behav[1]).all()  # unknown
    assert mb.padded_tokens == 10
    # scatter takes each row's response slice back
    back = mb.scatter(torch.arange(8.0).reshape(2, 4))
    assert [b.tolist() for b in back] == [[1.0, 2.0, 3.0], [4.0]]
    # a micro-batch is padded only to its own longest row
    assert collate(rows, [1]).input_ids.shape == (1, 2)


def test_row_validation():
    with pytest.raises(ValueError, match="prompt token"):
        row([], [1, 2])
    with pytest.raises(ValueError, match="response token"):
        row([1], [])


def make_rows():
    g = torch.Generator().manual_seed(3)
    rows = []
    specs = [  # (prompt len, response len)
        (3, 9), (2, 2), (4, 5), (1, 12), (3, 1), (2, 7), (5, 3),
    ]  # fmt: skip
    for k, (p, r) in enumerate(specs):
        ids = torch.randint(1, 40, (p + r,), generator=g).tolist()
        mask = [1.0] * r
        if k == 4:
            mask = [0.0] * r  # a masked-out (e.g. truncated) response
        rows.append(
            row(
                ids[:p],
                ids[p:],
                adv=float(torch.randn((), generator=g)),
                mask=mask,
                behav=(-torch.rand(r, generator=g) * 4).tolist(),
            )
        )
    return rows


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_micro_batches_give_the_big_batch_gradient(agg):
    """Packed micro-batches, each normalised by the whole batch's counts, accumulate exactly
    the gradient of one forward/backward over the whole (padded) batch."""
    model = tiny_llama().double()
    rows = make_rows()
    # a fixed proximal policy different from the current one, so ratios and clipping are live
    for r in rows:
        r.logp_prox = r.logp_behav + 0.1
    num_tokens = sum(r.n_loss_tokens for r in rows)
    num_seqs = sum(1 for r in rows if r.n_loss_tokens > 0)

    def grads(plan):
        model.zero_grad(set_to_none=True)
        total = 0.0
        for idx in plan:
            mb = collate(rows, idx)
            logits = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask).logits
            logp = token_logprobs(logits[:, :-1], mb.targets)
            out = policy_loss(
                logp, mb.logp_prox, mb.advantages, mb.mask, logp_behav=mb.logp_behav,
                clip_eps_low=0.2, clip_eps_high=0.28, loss_agg=agg,
                num_tokens=num_tokens, num_seqs=num_seqs, norm_tokens=16,
            )  # fmt: skip
            out.loss.backward()
            total += float(out.loss.detach())
        return len(plan), total, {n: p.grad.clone() for n, p in model.named_parameters()}

    n_big, loss_big, g_big = grads([list(range(len(rows)))])
    n_small, loss_small, g_small = grads(plan_micro_batches([r.length for r in rows], 24))
    assert n_big == 1 and n_small >= 4
    assert loss_small == pytest.approx(loss_big, abs=1e-12)
    for name, g in g_big.items():
        assert torch.allclose(g_small[name], g, atol=1e-12, rtol=1e-9), name
    assert any(g.abs().max() > 0 for g in g_big.values())
