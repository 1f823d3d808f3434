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
    res = _run([*SMALL, "--policies", "sorted", *args, "--json", str(out)])  # later flags win
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


@pytest.mark.parametrize(
    ("args", "message"),
    [
        # sorted-drop and sorted-keep set the cache themselves: --cache would do nothing.
        (["--cache", "drop"], "--cache is set, but no policy in --policies reads it"),
        (["--policies", "sync", "--max-staleness", "1"], "--max-staleness is set, but no policy"),
        (["--policies", "sync,partial", "--admission", "fill"], "--admission is set"),
        (["--policies", "sync", "--cache", "keep"], "sync never holds work across an update"),
        (["--rollout-replicas", "0"], "--rollout-replicas must be >= 1"),
        (["--policies", "sorted", "--trainer-ranks", "1"], "the trainer runs on the 2 rollout"),
        (["--filter-equal-rewards"], "--filter-equal-rewards needs --solve-rate"),
        (["--solve-rate", "1.5"], "--solve-rate must be in [0, 1]"),
        (["--policies", "sync,partial", "--update-pacing"], "--update-pacing is set, but no"),
        (["--max-new-tokens", "65"], "exceeds the response cap 64 that preset 'test-tiny'"),
    ],
)
def test_an_option_no_chosen_policy_reads_is_an_error(tmp_path, args, message):
    out = tmp_path / "r.json"
    small = ["--preset", "test-tiny", "--prompts", "8", "--group-size", "2", "--update-batch", "2"]
    res = _run([*small, *args, "--json", str(out)])
    assert res.exit_code == 2, res.output
    assert message in " ".join(res.output.split())
    assert not out.exists()


def test_settings_hold_every_scheduler_setting_and_nothing_unused(tmp_path):
    out = tmp_path / "r.json"
    assert _run([*SMALL, "--policies", "sorted", "--json", str(out)]).exit_code == 0
    settings = json.loads(out.read_text())["settings"]
    assert "extra" not in settings
    assert settings["max_new_tokens"] == 64  # the preset's response cap
    assert settings["filter_equal_rewards"] is False and settings["max_staleness"] == 2


def test_filter_equal_rewards_is_settable_and_filters(tmp_path):
    out = tmp_path / "r.json"
    args = [*SMALL, "--policies", "sync,sorted", "--filter-equal-rewards", "--solve-rate", "0.5"]
    res = _run([*args, "--json", str(out)])
    assert res.exit_code == 0, res.output
    for p in json.loads(out.read_text())["policies"].values():
        # With G=4 and a fair coin, 2/16 of the groups are all right or all wrong.
        assert p["prompts_dropped_by_reason"].get("equal_rewards", 0) > 0
        assert p["prompts_admitted"] == p["prompts_trained"] + p["prompts_dropped"] == 40


def test_max_new_tokens_below_the_preset_cap_caps_the_responses(tmp_path):
    out = tmp_path / "r.json"
    res = _run([*SMALL, "--policies", "sorted", "--max-new-tokens", "8", "--json", str(out)])
    assert res.exit_code == 0, res.output
    p = json.loads(out.read_text())["policies"]["sorted"]
    assert p["tokens_trained"] <= 8 * p["samples_trained"]


def test_a_trace_shorter_than_the_default_prompts_is_simulated_whole(tmp_path):
    trace = tmp_path / "t.jsonl"
    trace.write_text(
        "".join(json.dumps({"prompt_id": f"p{i}", "lengths": [5 + i, 9]}) + "\n" for i in range(10))
    )
    out = tmp_path / "r.json"
    args = ["--preset", "test-tiny", "--trace", str(trace), "--policies", "sync"]
    res = _run([*args, "--update-batch", "2", "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert "simulating all its 10 prompts" in " ".join(res.output.split())
    doc = json.loads(out.read_text())
    assert doc["settings"]["prompts"] == 10
    assert doc["policies"]["sync"]["prompts_trained"] == 10


def test_help_lists_the_numbers_each_preset_rests_on():
    res = CliRunner().invoke(main, ["simulate", "--help"], terminal_width=400)
    text = " ".join(res.output.split())
    for needle in (
        "llama3.1-8b-h100: Llama-3.1-8B (8.03B params, 32 layers, 8 KV heads x 128) on 8 x",
        "3.35 TB/s, 989 TFLOP/s bf16), tp 1, max_num_seqs 96 per replica",
        "qwen2.5-32b-h100: Qwen2.5-32B (32.8B params, 64 layers",
        "tp 4, max_num_seqs 192 per replica",
    ):
        assert needle in text


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
