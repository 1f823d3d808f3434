"""`RayTrainerGroup`: FSDP2 trainer ranks in Ray actors, as one `Trainer` in the driver.

A local Ray (the module's `ray_local`), single-threaded actors, gloo. Each test stops the
groups and the placement it made.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("ray")

from sortedrl.cluster.config import ClusterConfig  # noqa: E402
from sortedrl.cluster.placement import Placement  # noqa: E402
from sortedrl.cluster.trainers import RayTrainerGroup, TrainerRankDied, tied_aliases  # noqa: E402
from sortedrl.config import TrainConfig  # noqa: E402
from sortedrl.training.distributed import load_checkpoint_weights  # noqa: E402
from sortedrl.training.trainer import GRPOTrainer  # noqa: E402
from tests.grpo_batches import make_batch  # noqa: E402
from tests.tiny_llama import tiny_llama  # noqa: E402

SEED = 5
# lr and adam_eps as in test_fsdp.py (see there why)
TRAINER = {
    "lr": 1e-3,
    "adam_eps": 1e-6,
    "truncated": "mask",
    "mini_batches": 2,
    "max_tokens_per_micro_batch": 16,
}


def config(ranks: int) -> TrainConfig:
    cluster = ClusterConfig(backend="ray", trainer_ranks=ranks)
    return TrainConfig(seed=SEED, cluster=cluster, trainer=TRAINER)


class Groups:
    """Trainer groups and placements made by one test, all stopped at its end."""

    def __init__(self) -> None:
        self.made: list[tuple[RayTrainerGroup, Placement]] = []

    def new(self, ranks: int, model) -> RayTrainerGroup:
        cfg = config(ranks)
        placement = Placement(cfg.cluster, policy="sync", device="cpu")
        placement.start()
        try:
            group = RayTrainerGroup(cfg, model, placement)
        except BaseException:
            placement.close()
            raise
        self.made.append((group, placement))
        return group

    def close(self) -> None:
        for group, placement in self.made:
            group.close()
            placement.close()


@pytest.fixture
def groups(ray_local):
    made = Groups()
    yield made
    made.close()


def weights_of(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_two_ranks_update_like_one_local_trainer_and_hand_the_weights_on_by_reference(groups):
    import ray

    driver, local = tiny_llama(0), tiny_llama(0)
    initial = weights_of(driver)
    group = groups.new(2, driver)
    trainer = GRPOTrainer(local, config(1).trainer, seed=SEED)
    for version in range(2):
        got, want = group.update(make_batch(version)), trainer.update(make_batch(version))
        assert not got.skipped
        assert got.stats["loss"] == pytest.approx(want.stats["loss"], rel=1e-4, abs=1e-6)
        assert 0 < got.stats["weights_gather_s"] < got.elapsed_s
        assert isinstance(got.weights, ray.ObjectRef)  # not a copy in the driver
    weights = ray.get(got.weights)
    assert all(type(w) is torch.Tensor and w.device.type == "cpu" for w in weights.values())
    assert got.stats["weight_bytes"] == sum(w.numel() * 4 for w in weights.values())  # fp32
    assert max_diff(weights, weights_of(local)) < 1e-5
    # The driver's model is left alone until something in the driver reads it.
    assert max_diff(weights_of(driver), initial) == 0
    group.pull_weights()
    assert max_diff(weights_of(driver), weights_of(local)) < 1e-5


def test_a_group_loaded_from_a_checkpoint_makes_the_next_update_of_the_saved_one(groups, tmp_path):
    import ray

    driver = tiny_llama(0)
    saved = groups.new(2, driver)
    saved.update(make_batch(0))
    assert saved.save_checkpoint(str(tmp_path / "trainer")) is None  # nothing for trainer.pt
    saved.pull_weights()
    after_first = weights_of(driver)
    want = saved.update(make_batch(1))
    # the shards alone give the weights to one process (`sortedrl evaluate` on a checkpoint)
    alone = tiny_llama(2)
    load_checkpoint_weights(alone, tmp_path / "trainer", tied_aliases(alone))
    assert max_diff(weights_of(alone), after_first) == 0

    # a group of another size: the sharded checkpoint is resharded on load
    fresh = tiny_llama(1)
    resumed = groups.new(1, fresh)
    resumed.load_checkpoint(str(tmp_path / "trainer"), None)
    assert max_diff(weights_of(fresh), after_first) < 1e-6
    got = resumed.update(make_batch(1))
    # same optimizer moments, schedule, step count and mini-batch split: the same update
    assert got.stats["step"] == want.stats["step"] == 4
    assert max_diff(ray.get(got.weights), ray.get(want.weights)) < 1e-5


@pytest.mark.parametrize("tied", [False, True])
def test_the_ranks_export_a_model_directory_that_transformers_loads_with_the_trained_weights(
    groups, tmp_path, tied
):
    import json

    import ray
    from transformers import AutoModelForCausalLM

    driver = tiny_llama(0)
    if tied:  # the lm_head is the embedding: written once, under its first name
        driver.config.tie_word_embeddings = True
        driver = type(driver)(driver.config)
    initial = weights_of(driver)
    group = groups.new(2, driver)
    got = group.update(make_batch(0))
    trained = ray.get(got.weights)
    total = sum(w.numel() * w.element_size() for w in trained.values())
    out = tmp_path / "model"
    group.export_pretrained(str(out), shard_bytes=total // 3)  # several files and an index
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) >= 3 and all((out / f).is_file() for f in files)
    assert set(index["weight_map"]) == set(trained)
    assert max_diff(weights_of(driver), initial) == 0  # the driver's model was never read
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert type(loaded) is type(driver)
    assert tied_aliases(loaded) == tied_aliases(driver) == ({"lm_head.weight"} if tied else set())
    weights = {k: v for k, v in weights_of(loaded).items() if k not in tied_aliases(loaded)}
    assert max_diff(weights, trained) == 0  # bit for bit

    one = tmp_path / "one"
    group.export_pretrained(str(one))  # the default shard size: a single file
    assert (one / "model.safetensors").is_file()
    assert not (one / "model.safetensors.index.json").exists()
    weights = weights_of(AutoModelForCausalLM.from_pretrained(one))
    assert max_diff({k: v for k, v in weights.items() if k in trained}, trained) == 0


def test_a_killed_rank_stops_the_group_with_a_message_saying_how_to_resume(groups):
    import ray

    group = groups.new(2, tiny_llama(0))
    ray.kill(group.ranks[1])
    with pytest.raises(TrainerRankDied, match=r"trainer rank 1 died during update") as err:
        group.update(make_batch(0))
    assert "--resume auto" in str(err.value)
    with pytest.raises(ray.exceptions.RayActorError):  # rank 0 was stopped with it
        ray.get(group.ranks[0].rendezvous.remote(), timeout=60)
