"""`sortedrl simulate` end to end: output contract and clear errors for bad input."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from sortedrl.cli import main

SMALL = [
    "--preset",
    "test-tiny",
    "--prompts",
    "40",
    "--group-size",
    "4",
    "--rollout-batch",
    "8",
    "--update-batch",
    "4",
]
KEYS = [
    "bubble_ratio",
    "wall_time_s",
    "rollout_time_s",
    "update_time_s",
    "tokens_generated",
    "tokens_trained",
    "tokens_wasted",
    "prompts_admitted",
    "prompts_trained",
    "prompts_dropped",
    "max_staleness_trained",
    "mean_staleness_trained",
    "updates",
    "goodput_tokens_per_s",
]


def _run(args):
    return CliRunner().invoke(main, ["simulate", *args])


def test_simulate_writes_the_promised_json_and_plot(tmp_path):
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    res = _run(
        [*SMALL, "--policies", "sync,sorted,partial,async", "--json", str(out), "--plot", str(png)]
    )
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert set(doc["policies"]) == {"sync", "sorted", "partial", "async"}
    for p in doc["policies"].values():
        assert all(k in p for k in KEYS)
        assert p["prompts_admitted"] == p["prompts_trained"] + p["prompts_dropped"] == 40
        assert p["tokens_generated"] == p["tokens_trained"] + p["tokens_wasted"]
    assert png.stat().st_size > 1000


def test_same_seed_same_numbers(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    assert _run([*SMALL, "--policies", "sorted", "--json", str(a)]).exit_code == 0
    assert _run([*SMALL, "--policies", "sorted", "--json", str(b)]).exit_code == 0
    assert json.loads(a.read_text())["policies"] == json.loads(b.read_text())["policies"]


def test_trace_sets_group_size(tmp_path):
    trace = tmp_path / "t.jsonl"
    trace.write_text(
        "".join(
            json.dumps({"prompt_id": f"p{i}", "lengths": [5 + i, 30, 8]}) + "\n" for i in range(12)
        )
    )
    out = tmp_path / "r.json"
    res = _run(
        [
            "--preset",
            "test-tiny",
            "--trace",
            str(trace),
            "--prompts",
            "12",
            "--rollout-batch",
            "6",
            "--update-batch",
            "3",
            "--policies",
            "sync,sorted",
            "--json",
            str(out),
        ]
    )
    assert res.exit_code == 0, res.output
    assert json.loads(out.read_text())["settings"]["group_size"] == 3


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--preset", "nope"], "unknown preset 'nope'"),
        (["--policies", "sync,fastest"], "unknown policy 'fastest'"),
        (["--policies", "sync,sorted", "--update-batch", "16"], "must not exceed rollout_batch"),
        (["--group-size", "0"], "--group-size must be >= 1"),
        (["--lengths", "lognormal:median=-3,sigma=1"], "median"),
    ],
)
def test_bad_arguments_get_a_clear_error_and_nothing_is_written(tmp_path, args, message):
    out = tmp_path / "r.json"
    res = _run([*SMALL, "--policies", "sync", *args, "--json", str(out)])  # later flags win
    assert res.exit_code == 2
    assert message in res.output
    assert "Traceback" not in res.output
    assert not out.exists()


@pytest.mark.parametrize(
    ("line", "field"),
    [
        ('{"prompt_id": "p1", "lengths": [3, -1]}', "lengths"),
        ('{"prompt_id": "p1"}', "lengths"),
        ('{"prompt_id": "p1", "lengths": [3, 4]', None),
    ],
)
def test_bad_trace_names_file_line_and_field(tmp_path, line, field):
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"prompt_id": "p0", "lengths": [3, 4]}\n' + line + "\n")
    out = tmp_path / "r.json"
    res = _run(
        [
            "--preset",
            "test-tiny",
            "--trace",
            str(trace),
            "--prompts",
            "2",
            "--rollout-batch",
            "2",
            "--update-batch",
            "1",
            "--policies",
            "sync",
            "--json",
            str(out),
        ]
    )
    assert res.exit_code == 2, res.output
    assert f"{trace}:2" in res.output.replace("\n", "")
    if field:
        assert field in res.output
    assert not out.exists()


def test_epochs_replay_the_prompts(tmp_path):
    out = tmp_path / "r.json"
    args = [*SMALL, "--policies", "sync,sorted", "--epochs", "3", "--json", str(out)]
    res = _run([*args, "--update-pacing", "--submit-order", "longest_predicted"])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert doc["settings"]["epochs"] == 3 and doc["settings"]["update_pacing"] is True
    for summary in doc["policies"].values():
        assert summary["prompts_admitted"] == summary["prompts_trained"] == 120
    res = _run([*SMALL, "--policies", "sync", "--epochs", "0"])
    assert res.exit_code == 2 and "--epochs must be >= 1" in res.output
