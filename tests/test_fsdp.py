"""FSDP2 data parallelism: two ranks on gloo make the same update as one process.

Two processes (torch.multiprocessing, no Ray) each run `FSDPTrainer` on the same batch; rank 0
saves the full weights, the full optimizer state and its statistics after each scenario. One
`GRPOTrainer` in this process makes the reference. The batch is built so that the two ranks'
shares differ in tokens and in micro-batches (one long row against several short ones), and
one truncated row is masked out of the loss.

Why the optimizer state is compared too: AdamW's step is invariant to the gradient's scale
(its first step moves every weight by about `lr * sign(grad)`), so a group that averages
gradients where it should sum them makes nearly the same *weights*. Its first moment
(`exp_avg = (1 - beta1) * grad`) and its gradient norm are off by the world size, and that is
what catches it.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from torch.distributed.checkpoint.state_dict import (  # noqa: E402
    StateDictOptions,
    get_optimizer_state_dict,
)

from sortedrl.training.config import TrainerConfig  # noqa: E402
from sortedrl.training.distributed import (  # noqa: E402
    FSDPTrainer,
    init_process_group,
    set_gradient_reduction,
)
from sortedrl.training.packing import plan_micro_batches  # noqa: E402
from sortedrl.training.parallel import token_shares  # noqa: E402
from sortedrl.training.rows import build_rows  # noqa: E402
from sortedrl.training.trainer import GRPOTrainer  # noqa: E402
from tests.grpo_batches import make_batch  # noqa: E402
from tests.tiny_llama import tiny_llama  # noqa: E402

WORLD = 2
SEED = 7
TOL = 1e-5

# AdamW moves a weight by about lr * g / (|g| + adam_eps): with the default eps (1e-8) a
# gradient that is zero up to float rounding (different on one process and on two ranks, which
# add the same terms in another order) can move a weight by up to lr. A larger eps keeps the
# comparison at rounding level; a wrong gradient still moves weights by ~lr = 1e-3 >> 1e-5.
BASE = dict(lr=1e-3, adam_eps=1e-6, truncated="mask", max_tokens_per_micro_batch=16)
SCENARIOS: dict[str, tuple[TrainerConfig, int, float | None]] = {
    # name: (config, updates, divide factor forced onto the group, None = the right one)
    "one_update": (TrainerConfig(**BASE), 1, None),
    "two_updates_two_mini_batches": (TrainerConfig(**BASE, mini_batches=2), 2, None),
    "kl_to_a_sharded_reference": (TrainerConfig(**BASE, mini_batches=2, kl_coef=0.1), 1, None),
    # no clipping: clipping to a fixed norm would hide a scale error in the clipped gradient
    "averaging_group": (TrainerConfig(**BASE, max_grad_norm=None), 1, float(WORLD)),
    "summing_group": (TrainerConfig(**BASE, max_grad_norm=None), 1, None),
    "non_finite_on_one_rank": (TrainerConfig(**BASE), 1, None),
}


def run_updates(trainer, name: str) -> list:
    _, updates, _ = SCENARIOS[name]
    poisoned = name == "non_finite_on_one_rank"
    return [trainer.update(make_batch(v, poisoned)) for v in range(updates)]


# --- the two ranks ---------------------------------------------------------------------------


def rank_main(rank: int, port: int, out_dir: str) -> None:
    """One rank: every scenario in turn; rank 0 saves what the tests compare."""
    torch.set_num_threads(1)
    device = torch.device("cpu")
    init_process_group(rank, WORLD, "127.0.0.1", port, device)
    try:
        for name, (config, _, divide_factor) in SCENARIOS.items():
            trainer = FSDPTrainer(tiny_llama(0), config, device, seed=SEED)
            if divide_factor is not None:
                set_gradient_reduction(trainer.model, divide_factor)
            results = run_updates(trainer, name)
            weights = trainer.full_state_dict()
            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            optim = get_optimizer_state_dict(
                trainer.model, trainer.trainer.optimizer, options=options
            )
            if rank == 0:
                saved = {"weights": weights, "optim": optim["state"], "results": results}
                torch.save(saved, Path(out_dir) / f"{name}.pt")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Rank 0's saved outputs per scenario (the processes run once for the module)."""
    out = tmp_path_factory.mktemp("fsdp")
    mp.spawn(rank_main, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    return {name: torch.load(out / f"{name}.pt", weights_only=False) for name in SCENARIOS}


def one_process(name: str) -> dict:
    """The reference: one GRPOTrainer on the whole batch."""
    config, _, _ = SCENARIOS[name]
    model = tiny_llama(0)
    trainer = GRPOTrainer(model, config, seed=SEED)
    results = run_updates(trainer, name)
    names = {p: n for n, p in model.named_parameters()}
    optim = {names[p]: s for p, s in trainer.optimizer.state.items()}
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {"weights": weights, "optim": optim, "results": results}


def max_diff(a: dict, b: dict) -> float:
    """Largest absolute difference over the weights, exp_avg and exp_avg_sq of `a` and `b`."""
    assert a["weights"].keys() == b["weights"].keys()
    diffs = [float((a["weights"][k] - b["weights"][k]).abs().max()) for k in a["weights"]]
    assert a["optim"].keys() == b["optim"].keys()
    for k in a["optim"]:
        for moment in ("exp_avg", "exp_avg_sq"):
            diffs.append(float((a["optim"][k][moment] - b["optim"][k][moment]).abs().max()))
    return max(diffs)


# --- the tests -------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 50), max_size=40), st.integers(1, 4))
def test_token_shares_partition_the_rows_and_balance_their_tokens(lengths, world):
    shares = token_shares(lengths, world)
    assert len(shares) == world
    assert sorted(i for s in shares for i in s) == list(range(len(lengths)))
    assert shares == token_shares(lengths, world)  # the same on every rank
    loads = [sum(lengths[i] for i in s) for s in shares]
    # greedy longest-first: no share exceeds another by more than one row
    assert max(loads) - min(loads) <= max(lengths, default=0)


def test_the_batch_splits_unevenly_over_the_two_ranks():
    rows, _ = build_rows(make_batch(0), TrainerConfig(**BASE))
    lengths = [r.length for r in rows]
    shares = token_shares(lengths, WORLD)
    tokens = [sum(lengths[i] for i in s) for s in shares]
    assert sorted(i for s in shares for i in s) == list(range(len(rows)))
    assert tokens[0] != tokens[1], tokens
    plans = [
        plan_micro_batches([lengths[i] for i in s], BASE["max_tokens_per_micro_batch"])
        for s in shares
    ]
    assert len(plans[0]) != len(plans[1])  # one rank runs an idle pass to keep in step
    assert sum(1 for r in rows if r.n_loss_tokens == 0) == 1  # the masked truncated row


@pytest.mark.parametrize(
    "name", ["one_update", "two_updates_two_mini_batches", "kl_to_a_sharded_reference"]
)
def test_two_ranks_make_the_same_update_as_one_process(two_ranks, name):
    mine, ref = two_ranks[name], one_process(name)
    assert max_diff(mine, ref) < TOL
    for got, want in zip(mine["results"], ref["results"], strict=True):
        assert not got.skipped and not want.skipped
        for key in ("loss", "pg_loss", "kl", "grad_norm", "entropy", "clip_frac", "ratio_mean"):
            assert got.stats[key] == pytest.approx(want.stats[key], rel=1e-4, abs=1e-6), key
        for key in ("optimizer_steps", "loss_tokens", "samples", "prox_recomputed"):
            assert got.stats[key] == want.stats[key], key
        # every weight is a plain CPU tensor under the model's own name
        assert all(type(w) is torch.Tensor and w.device.type == "cpu" for w in got.weights.values())
        assert got.weights.keys() == ref["weights"].keys()


def test_a_group_that_averages_gradients_instead_of_summing_is_caught(two_ranks):
    right, wrong = two_ranks["summing_group"], two_ranks["averaging_group"]
    ref = one_process("summing_group")
    assert max_diff(right, ref) < TOL
    assert max_diff(wrong, ref) > 1e-4
    # the reported global norm shows it too: half the real one
    norm = ref["results"][0].stats["grad_norm"]
    assert wrong["results"][0].stats["grad_norm"] == pytest.approx(norm / WORLD, rel=1e-4)


def test_a_non_finite_loss_on_one_rank_skips_the_step_on_both(two_ranks):
    mine, ref = two_ranks["non_finite_on_one_rank"], one_process("non_finite_on_one_rank")
    initial = tiny_llama(0).state_dict()
    assert mine["results"][0].skipped and ref["results"][0].skipped
    assert mine["results"][0].stats["skipped_nonfinite"] == 1
    for k, w in mine["weights"].items():
        assert torch.equal(w, initial[k]), k
