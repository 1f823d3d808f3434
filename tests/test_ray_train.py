"""`sortedrl train cluster.backend=ray`: two engine replicas and two FSDP2 trainer ranks in Ray
actors on a local Ray instance, end to end on the tiny model: the counts balance, checkpoints
are sharded, a killed replica is replaced, and a killed trainer rank stops the run at its last
checkpoint, from which `--resume auto` finishes with every prompt trained exactly once."""

from __future__ import annotations

import json

import pytest

from sortedrl.config import load_config
from sortedrl.errors import TrainerFailedError

pytestmark = pytest.mark.usefixtures("cache")


@pytest.fixture
def ray_run(tiny_run):
    """The tiny run (16 prompts x 2 responses, updates of 2 groups) on 2 replicas and 2 ranks,
    with longer responses and checkpoints every 2 updates."""
    return [
        "cluster.backend=ray",
        "cluster.rollout_replicas=2",
        "cluster.trainer_ranks=2",
        *tiny_run,
        "task.eval_prompts=8",
        "model.warm_start_steps=5",
        "scheduler.max_new_tokens=32",
        "checkpoint.every_updates=2",
    ]


def _balanced(s: dict) -> None:
    assert s["prompts_admitted"] == s["prompts_trained"] == 16
    assert s["tokens_generated"] == s["tokens_trained"] + s["tokens_wasted"]


def _trained_prompts(out) -> list[str]:
    return [json.loads(x)["prompt_id"] for x in (out / "trace.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("policy", ["sorted", "async"])  # colocated; separate (its default)
def test_two_replicas_and_two_ranks_train_and_counts_balance(
    ray_local,
    ray_run,
    tmp_path,
    policy,
):
    from sortedrl.commands.train import train

    out = tmp_path / "run"
    summary = train(
        load_config(None, [*ray_run, f"scheduler.policy={policy}"]), out, progress=False
    )
    _balanced(summary)
    assert sorted(_trained_prompts(out)) == sorted(set(_trained_prompts(out)))
    stats = summary["engine_stats"]
    assert len(stats["replicas"]) == 2 and stats["replica_restarts"] == 0
    assert all(r["tokens_generated"] > 0 for r in stats["replicas"])  # both replicas worked
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(line["train/weights_gather_s"] >= 0 for line in lines)
    ckpts = sorted((out / "checkpoints").glob("step-*"))
    assert ckpts and (ckpts[-1] / "trainer_dcp" / ".metadata").is_file()
    # the ranks' shards are the checkpoint's weights: the driver wrote no copy of its own
    assert not any((c / "model.safetensors").exists() for c in ckpts)
    # the ranks wrote the final model; it loads in transformers with the weights of the last
    # checkpoint, read from its shards in this one process
    from transformers import AutoModelForCausalLM

    from sortedrl.training.distributed import load_checkpoint_weights

    final = AutoModelForCausalLM.from_pretrained(out / "model")
    want = AutoModelForCausalLM.from_pretrained(out / "model")
    for p in want.parameters():
        p.data.zero_()
    load_checkpoint_weights(want, ckpts[-1] / "trainer_dcp", set())
    got, ref = final.state_dict(), want.state_dict()
    assert got.keys() == ref.keys() and all(got[k].equal(ref[k]) for k in got)
    assert not ray_local.util.placement_group_table() or all(
        pg["state"] == "REMOVED" for pg in ray_local.util.placement_group_table().values()
    )


def test_a_killed_trainer_rank_stops_the_run_and_resume_finishes_exactly_once(
    ray_local,
    ray_run,
    tmp_path,
    monkeypatch,
):
    from sortedrl.commands import run as run_module
    from sortedrl.commands.train import train

    out = tmp_path / "run"
    on_update = run_module.Run.on_update

    def kill_rank_after_update_3(self, record, batch, result):
        on_update(self, record, batch, result)
        if record.step == 3:
            ray_local.kill(self.trainer.ranks[1])

    monkeypatch.setattr(run_module.Run, "on_update", kill_rank_after_update_3)
    with pytest.raises(TrainerFailedError, match=r"trainer rank 1 died.*step-00000002"):
        train(load_config(None, ray_run), out, progress=False)
    monkeypatch.setattr(run_module.Run, "on_update", on_update)

    summary = train(load_config(None, [*ray_run, "resume=auto"]), out, progress=False)
    assert summary["resumed_from"].endswith("step-00000002")
    _balanced(summary)
    trained = _trained_prompts(out)
    assert len(trained) == len(set(trained)) == 16  # every prompt trained exactly once
