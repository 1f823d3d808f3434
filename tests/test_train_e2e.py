"""End to end: `train` with a tiny budget writes every output, and the counts balance."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from sortedrl.config import load_config  # noqa: E402

# The tiny run with more held-out problems, a longer warm start, longer responses and the
# default sampled evaluation, so every output has something in it.
MORE = [
    "task.eval_prompts=8",
    "model.warm_start_steps=5",
    "scheduler.max_new_tokens=32",
    "eval.sampled=4",
]


def test_train_writes_outputs_and_counts_balance(tmp_path, cache, tiny_run):
    from sortedrl.commands.train import train

    out = tmp_path / "run"
    cfg = load_config(None, [*tiny_run, *MORE])
    summary = train(cfg, out, progress=False)

    for name in ("metrics.jsonl", "summary.json", "report.png"):
        assert (out / name).is_file(), name
    assert (out / "model" / "config.json").is_file()
    assert (out / "model" / "model.safetensors").is_file()
    assert any((out / "tb").iterdir())
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    doc = json.loads((out / "summary.json").read_text())
    for key in ("eval_before", "eval_after", "bubble_ratio", "wall_time_s", "updates"):
        assert key in doc, key
    for ev in (doc["eval_before"], doc["eval_after"]):
        assert 0.0 <= ev["pass@1"] <= 1.0
        assert {"accuracy", "reward_mean", "response_len_mean"} <= set(ev)
    assert summary["updates"] == doc["updates"]

    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == doc["updates"] >= 1
    for line in lines:
        for key in (
            "step",
            "policy_version",
            "reward_mean",
            "accuracy",
            "response_len_mean",
            "bubble_ratio",
            "max_staleness_trained",
            "samples_trained",
            "time_s",
        ):
            assert key in line, key
        assert 0.0 <= line["accuracy"] <= 1.0
    assert [x["step"] for x in lines] == list(range(1, len(lines) + 1))
    assert lines[-1]["samples_trained"] == doc["samples_trained"]
    assert sum(x["samples"] for x in lines) == doc["samples_trained"]

    # Every admitted prompt is trained, dropped or in flight; one epoch admits all 16.
    assert doc["prompts_admitted"] == 16
    assert doc["prompts_admitted"] == (
        doc["prompts_trained"] + doc["prompts_dropped"] + doc["prompts_in_flight"]
    )
    assert doc["samples_trained"] == 2 * doc["prompts_trained"]
    assert doc["tokens_generated"] == (
        doc["tokens_trained"] + doc["tokens_wasted"] + doc["tokens_in_flight"]
    )

    # The warm-started tiny model was cached and is reused.
    cached = list(cache.glob("tiny-*"))
    assert len(cached) == 1 and (cached[0] / "config.json").is_file()

    # The run wrote its own length trace, which the simulator reads back.
    from sortedrl.workload import Workload

    trace = Workload.from_trace(str(out / "trace.jsonl"), cap=64)
    assert len(trace) == doc["prompts_trained"] and trace.group_size == 2

    # `sortedrl eval` scores the trained model directory.
    from click.testing import CliRunner

    from sortedrl.cli import main

    res = CliRunner().invoke(
        main,
        [
            "eval",
            "--model",
            str(out / "model"),
            "--prompts",
            "4",
            "--max-new-tokens",
            "16",
            "--json",
            str(tmp_path / "eval.json"),
        ],
    )
    assert res.exit_code == 0, res.output
    scores = json.loads((tmp_path / "eval.json").read_text())
    assert 0.0 <= scores["pass@1"] <= 1.0 and scores["problems"] == 4


def test_train_cli_bad_override_is_one_line(tmp_path):
    from click.testing import CliRunner

    from sortedrl.cli import main

    res = CliRunner().invoke(main, ["train", "--out", str(tmp_path), "scheduler.group_size=0"])
    assert res.exit_code == 2
    assert "scheduler.group_size" in res.output


def test_missing_model_path_is_a_config_error(tmp_path):
    from sortedrl.commands.prepare import prepare_model
    from sortedrl.errors import ConfigError

    cfg = load_config(None, [f"model.path={tmp_path}"])
    with pytest.raises(ConfigError, match="config.json"):
        prepare_model(cfg, None)


def test_train_model_flag_names_a_missing_directory(tmp_path):
    from click.testing import CliRunner

    from sortedrl.cli import main

    res = CliRunner().invoke(main, ["train", "--out", str(tmp_path), "--model", "/nonexistent"])
    assert res.exit_code == 2
    assert "model.path: /nonexistent is not a directory" in res.output
