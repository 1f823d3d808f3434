"""On Ray, responses are scored inside the engine replicas: your reward functions' failures
come back with each score and are counted, printed and logged as in a local run."""

from __future__ import annotations

import json

import pytest

from sortedrl.config import load_config

pytestmark = pytest.mark.usefixtures("cache")


def test_reward_failures_scored_in_the_replicas_are_counted_and_shown(
    ray_local, tiny_run, tmp_path, capsys
):
    from sortedrl.commands.train import train

    args = [
        "cluster.backend=ray",
        "cluster.rollout_replicas=2",
        *tiny_run,
        "task.reward_fns=[tests.reward_fns:raises, tests.reward_fns:always_one]",
        "task.reward_workers=0",
        "max_updates=2",
    ]
    out = tmp_path / "run"
    summary = train(load_config(None, args), out, progress=False)
    assert "reward function 'raises' failed" in capsys.readouterr().out
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for line in lines:
        assert line["reward_failures/raises/raised"] == line["samples"]
        assert line["rewards/always_one/mean"] == 1.0 and line["reward_mean"] == 1.0
    assert summary["reward_failures"]["raises"]["raised"] == sum(x["samples"] for x in lines)
