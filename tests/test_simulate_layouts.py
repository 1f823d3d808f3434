"""`sortedrl simulate` with cluster layouts: the options reach the simulation, the default is
unchanged, and a layout that cannot be built is a clear error naming the option."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from sortedrl.cli import main
from sortedrl.engines.costmodel import get_preset
from sortedrl.errors import ConfigError
from sortedrl.sim.layout import LayoutSettings, cluster_spec, splits

SMALL = ["--preset", "test-tiny", "--prompts", "24", "--group-size", "4"]
SMALL += ["--update-batch", "4"]  # sorted and partial: --rollout-batch 8 (R)
R = ["--rollout-batch", "8"]


def _run(tmp_path, *args: str) -> dict:
    out = tmp_path / "r.json"
    res = CliRunner().invoke(main, ["simulate", *SMALL, *args, "--json", str(out)])
    assert res.exit_code == 0, res.output
    return json.loads(out.read_text())


def _without_ratios(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k != "vs_sync"}


def test_the_preset_layout_spelled_out_gives_the_default_results(tmp_path):
    default = _run(tmp_path, "--policies", "sync,sorted,partial,async", *R)
    assert default["settings"]["cluster"] == {}
    # async on 2 GPUs: the separate split 1 + 1 is the only one; the same numbers.
    args = ["--gpus", "2", "--tensor-parallel-size", "1", "--rollout-replicas", "1"]
    explicit = _run(tmp_path, "--policies", "async", *R, *args)["policies"]["async"]
    assert explicit == _without_ratios(default["policies"]["async"])
    coloc = _run(tmp_path, "--policies", "sync,sorted,partial", *R, "--layout", "colocated")
    assert coloc["settings"]["cluster"] == {"layout": "colocated"}
    for name in ("sync", "sorted", "partial"):
        assert coloc["policies"][name] == default["policies"][name]
        assert default["policies"][name]["layout"] == "colocated"
        assert default["policies"][name]["rollout_gpus"] == 2
        assert default["policies"][name]["train_gpus"] == 2


def test_separate_layout_trains_apart_with_fewer_rollout_gpus(tmp_path):
    coloc = _run(tmp_path, "--policies", "sync", "--gpus", "4")["policies"]["sync"]
    sep = _run(
        tmp_path,
        "--policies",
        "sync",
        "--gpus",
        "4",
        "--layout",
        "separate",
        "--rollout-replicas",
        "2",
        "--trainer-ranks",
        "2",
    )["policies"]["sync"]
    assert (coloc["capacity"], coloc["rollout_gpus"], coloc["train_gpus"]) == (32, 4, 4)
    assert (sep["capacity"], sep["rollout_gpus"], sep["train_gpus"]) == (16, 2, 2)
    assert sep["layout"] == "separate" and sep["trainer_ranks"] == 2
    # Same data, half the GPUs on each side: each side is slower, and each side's GPUs wait
    # while the other works.
    assert sep["rollout_time_s"] > coloc["rollout_time_s"]
    assert sep["update_time_s"] > coloc["update_time_s"]
    assert sep["wall_time_s"] > coloc["wall_time_s"]
    assert sep["gpu_busy_share"] < coloc["gpu_busy_share"]
    assert sep["tokens_trained"] == coloc["tokens_trained"]


def test_async_gets_faster_with_more_gpus_on_both_sides(tmp_path):
    small = _run(tmp_path, "--policies", "async", "--gpus", "2")["policies"]["async"]
    big = _run(
        tmp_path,
        "--policies",
        "async",
        "--gpus",
        "6",
        "--rollout-replicas",
        "4",
        "--trainer-ranks",
        "2",
    )["policies"]["async"]
    assert (small["rollout_gpus"], small["train_gpus"]) == (1, 1)
    assert (big["rollout_gpus"], big["train_gpus"], big["capacity"]) == (4, 2, 32)
    assert big["wall_time_s"] < small["wall_time_s"]


def test_separate_without_a_split_tries_every_whole_replica_split():
    spec = cluster_spec(LayoutSettings(gpus=16), get_preset("qwen2.5-32b-h100"))
    got = [(s.rollout_gpus, s.trainer_ranks) for s in splits(LayoutSettings(), spec, "async")]
    assert got == [(4, 12), (8, 8), (12, 4)]
    only = splits(LayoutSettings(trainer_ranks=6), spec, "async")
    assert [(s.rollout_replicas, s.trainer_ranks) for s in only] == [(2, 6)]
    with pytest.raises(ConfigError, match="async trains beside rollout"):
        splits(LayoutSettings(layout="colocated"), spec, "async")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--gpus", "0"], "--gpus must be >= 1"),
        (["--trainer-ranks", "0", "--layout", "separate"], "--trainer-ranks must be >= 1"),
        (["--tensor-parallel-size", "3"], "--tensor-parallel-size 3 exceeds --gpus 2"),
        (["--gpus", "3", "--tensor-parallel-size", "2"], "not a multiple of --tensor-parallel"),
        (["--gpus", "4", "--rollout-replicas", "3"], "= 3 GPUs, but --gpus is 4"),
        (["--layout", "colocated", "--policies", "sync,async"], "--layout colocated: async"),
        (["--trainer-ranks", "3"], "--trainer-ranks 3, but the trainer runs on the 2 rollout"),
        (["--layout", "separate", "--gpus", "1"], "--gpus 1 leaves no GPU to train"),
        (
            ["--layout", "separate", "--rollout-replicas", "2", "--trainer-ranks", "1"],
            "--trainer-ranks 1 GPUs must fit --gpus 2",
        ),
        (
            ["--preset", "qwen2.5-32b-h100", "--tensor-parallel-size", "1"],
            "--tensor-parallel-size 1: preset 'qwen2.5-32b-h100'",
        ),
    ],
)
def test_a_layout_that_cannot_be_built_is_an_error_naming_the_option(tmp_path, args, message):
    out = tmp_path / "r.json"
    res = CliRunner().invoke(
        main, ["simulate", *SMALL, "--policies", "sync", *args, "--json", str(out)]
    )
    assert res.exit_code == 2, res.output
    assert message in " ".join(res.output.split())
    assert "Traceback" not in res.output
    assert not out.exists()


def test_per_replica_bubbles_average_to_the_engine_bubble(tmp_path):
    args = ["--policies", "sync,sorted-keep,partial,async", *R, "--gpus", "4"]
    doc = _run(tmp_path, *args, "--layout", "separate", "--rollout-replicas", "3")
    for name, p in doc["policies"].items():
        per_replica = p["replica_bubble_ratio"]
        assert len(per_replica) == p["rollout_replicas"] == 3, name
        # Every replica has max_num_seqs slots: the engine's bubble is their mean.
        assert sum(per_replica) / 3 == pytest.approx(p["bubble_ratio"], abs=2e-4), name
    coloc = _run(tmp_path, "--policies", "sorted-keep", *R, "--gpus", "4")["policies"]
    per_replica = coloc["sorted-keep"]["replica_bubble_ratio"]
    assert len(per_replica) == 4
    assert sum(per_replica) / 4 == pytest.approx(coloc["sorted-keep"]["bubble_ratio"], abs=2e-4)


def test_colocated_replicas_must_cover_the_preset_gpus_when_no_gpu_count_is_given(tmp_path):
    out = tmp_path / "r.json"
    args = ["simulate", *SMALL, "--policies", "sync", "--rollout-replicas", "4"]
    res = CliRunner().invoke(main, [*args, "--json", str(out)])
    assert res.exit_code == 2
    assert "= 4 GPUs, but --gpus is 2 (preset 'test-tiny')" in " ".join(res.output.split())
    assert not out.exists()
