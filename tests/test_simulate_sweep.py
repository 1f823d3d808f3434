"""`sortedrl simulate --sweep` on a user's own lengths: a per-response dump as an RL trainer
writes one, a length spec, and clear errors for a bad file or a setting the sweep sets."""

from __future__ import annotations

import json
import random

import pytest
from click.testing import CliRunner

from sortedrl.cli import main
from sortedrl.errors import InputFileError
from sortedrl.workload import load_trace


def _run(args):
    return CliRunner().invoke(main, ["simulate", *args], terminal_width=250)


def _rollout_dump(path, prompts=24, group=4, seed=0):
    """Rows the way a trainer's rollout dump has them (verl's rollout_data_dir, OpenRLHF's
    and TRL's completion logs): one row per response, with the prompt's text, the response,
    its reward and the step, and its length in tokens; a pandas-written one has floats."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(prompts):
            base = rng.lognormvariate(2.5, 0.6)
            for k in range(group):
                n = max(1, min(64, int(base * rng.lognormvariate(0.0, 0.5))))
                row = {
                    "step": 3,
                    "prompt": f"Solve: what is {i} + 1?",
                    "response": "x" * n,
                    "reward": float(k % 2),
                    "response_length": float(n) if i % 2 else n,
                }
                f.write(json.dumps(row) + "\n")
    return path


def test_a_per_response_dump_loads_as_groups(tmp_path):
    path = _rollout_dump(tmp_path / "dump.jsonl")
    lengths, group = load_trace(str(path))
    assert group == 4 and len(lengths) == 24
    assert all(len(ls) == 4 and all(isinstance(x, int) for x in ls) for ls in lengths.values())
    assert "Solve: what is 0 + 1?" in lengths
    # Prompt ids (numbers or strings) work as well as prompt texts.
    ids = tmp_path / "ids.jsonl"
    ids.write_text(
        "".join(json.dumps({"prompt_id": i // 2, "response_length": 5}) + "\n" for i in range(6))
    )
    assert load_trace(str(ids)) == ({"0": [5, 5], "1": [5, 5], "2": [5, 5]}, 2)


@pytest.mark.parametrize(
    ("rows", "line", "field", "needle"),
    [
        ([{"prompt": "a", "response_length": 3}, {"prompt": "a"}], 2, "response_length", "missing"),
        (
            [{"prompt": "a", "response_length": 3}, {"prompt": "a", "response_length": 2.5}],
            2,
            "response_length",
            "positive integer",
        ),
        (
            [{"prompt": "a", "response_length": 3}, {"prompt": "a", "response_length": True}],
            2,
            "response_length",
            "positive integer",
        ),
        (
            [{"prompt": "a", "response_length": 3}, {"prompt": "a", "response_length": 0}],
            2,
            "response_length",
            "positive integer",
        ),
        ([{"prompt": "a", "response_length": 3}, {"response_length": 3}], 2, "prompt", "missing"),
        (
            [{"prompt": "a", "response_length": 3}, {"prompt": None, "response_length": 3}],
            2,
            "prompt",
            "non-empty",
        ),
        (
            [{"prompt": "a", "response_length": 3}] * 2 + [{"prompt": "b", "response_length": 3}],
            3,
            "response_length",
            "same number of responses",
        ),
    ],
)
def test_a_bad_dump_names_file_line_and_field(tmp_path, rows, line, field, needle):
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(InputFileError) as e:
        load_trace(str(path))
    assert f"{path}:{line}" in str(e.value) and f"'{field}'" in str(e.value)
    assert needle in str(e.value)


def test_sweep_on_a_dump_prints_the_table_and_a_recommendation(tmp_path):
    path = _rollout_dump(tmp_path / "dump.jsonl")
    out = tmp_path / "sweep.json"
    res = _run(
        [
            "--sweep",
            "--preset",
            "test-tiny",
            "--trace",
            str(path),
            "--update-batch",
            "2",
            "--json",
            str(out),
        ]
    )
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "recommended: sorted K=" in text and "of sync" in text
    doc = json.loads(out.read_text())
    rows = doc["rows"]
    assert set(rows) >= {"sync", "partial R=4U", "sorted K=1 R=auto", "sorted K=2 R=6U"}
    assert doc["recommended"] in rows and doc["recommended"].startswith("sorted")
    best = rows[doc["recommended"]]
    assert best["goodput_tokens_per_s"] == max(
        r["goodput_tokens_per_s"] for k, r in rows.items() if k.startswith("sorted")
    )
    for label, r in rows.items():
        if label.startswith("sorted"):
            assert r["max_staleness_trained"] <= r["max_staleness"]
    assert rows["sorted K=2 R=3U"]["rollout_batch"] == 6  # a fixed R stays fixed
    assert rows["sync"]["goodput_vs_sync"] == 1.0


def test_sweep_with_an_update_batch_over_the_fixed_default(tmp_path):
    # partial's R is 4U in the sweep, whatever its fixed default (32) would allow.
    res = _run(["--sweep", "--preset", "test-tiny", "--prompts", "80", "--update-batch", "40"])
    assert res.exit_code == 0, res.output


def test_sweep_on_a_length_spec(tmp_path):
    res = _run(
        [
            "--sweep",
            "--preset",
            "test-tiny",
            "--lengths",
            "lognormal:median=12,sigma=0.8",
            "--prompts",
            "32",
            "--group-size",
            "2",
            "--update-batch",
            "2",
        ]
    )
    assert res.exit_code == 0, res.output
    assert "recommended:" in res.output


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--rollout-batch", "8"], "--sweep sets --rollout-batch itself"),
        (["--max-staleness", "1"], "--sweep sets --max-staleness itself"),
        (["--policies", "sync,sorted"], "--sweep picks the policies itself"),
    ],
)
def test_sweep_refuses_what_it_sets_itself(extra, needle):
    res = _run(
        ["--sweep", "--preset", "test-tiny", "--prompts", "16", "--update-batch", "2", *extra]
    )
    assert res.exit_code == 2
    assert needle in " ".join(res.output.split())
