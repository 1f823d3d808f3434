"""Hostile or broken input files: configs, math datasets, traces.

Each case checks that loading fails with a SortedRLError (never a traceback) whose message
names the file and what is wrong (the line and the field where there is one), and that the
input file is byte-for-byte unchanged afterwards. Failed CLI runs must leave files already in
the output folder untouched.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from sortedrl.cli import main
from sortedrl.config import TrainConfig, load_config
from sortedrl.errors import ConfigError, InputFileError
from sortedrl.tasks.math import load_math_file
from sortedrl.workload import load_trace

MB = 1024 * 1024
OK_MATH = b'{"problem": "1 + 1?", "answer": "2"}\n'
OK_TRACE = b'{"prompt_id": "p0", "lengths": [3, 4]}\n'


def _write(tmp_path: Path, name: str, data: bytes | None) -> Path:
    p = tmp_path / name
    if data is None:
        p.mkdir()  # a directory where a file is expected
    else:
        p.write_bytes(data)
    return p


def _fails(loader, path: Path, error: type[Exception], *expected: str) -> str:
    """Load `path`, expect `error` naming the file and each of `expected`; file unchanged."""
    before = path.read_bytes() if path.is_file() else None
    with pytest.raises(error) as info:
        loader(str(path))
    msg = str(info.value)
    assert str(path) in msg, msg
    for part in expected:
        assert part in msg, (part, msg)
    assert len(msg) < 600, msg  # one clear line, not a dump of the input
    if before is not None:
        assert path.read_bytes() == before
    return msg


# ---------------------------------------------------------------------------- config (YAML)


def _load_config(path: str) -> TrainConfig:
    return load_config(path, [])


@pytest.mark.parametrize("data", [b"", b"\n\n", b"# only a comment\n", b"\xef\xbb\xbf"])
def test_empty_config_means_defaults(tmp_path, data):
    p = _write(tmp_path, "c.yaml", data)
    assert _load_config(str(p)) == load_config(None, [])
    assert p.read_bytes() == data


BAD_CONFIGS = [
    ("latin1", "seed: 1\nmodel:\n  path: caf\xe9\n".encode("latin-1"), ["not UTF-8", "byte 26"]),
    ("utf16", "seed: 1\n".encode("utf-16"), ["not UTF-8"]),
    ("invalid", b"seed: 1\nrollout:\n  group_size: 8\n   capacity: 4\n", [":4:", "invalid YAML"]),
    ("unclosed", b"seed: 1\nrollout: {group_size: 8\n", [":3:", "invalid YAML"]),
    ("nul", b"seed: 1\x00\n", ["invalid YAML", "#x0000"]),
    ("python_tag", b"seed: !!python/object/apply:os.system ['true']\n", [":1:", "invalid YAML"]),
    ("top_list", b"- rollout\n- scheduler\n", ["expected a mapping of sections"]),
    ("top_scalar", b"hello\n", ["expected a mapping of sections"]),
    ("unknown_section", b"rollouts:\n  group_size: 8\n", ["rollouts", "Extra inputs"]),
    ("unknown_field", b"scheduler:\n  group_sizes: 8\n", ["scheduler.group_sizes", "Extra inputs"]),
    ("wrong_type", b'scheduler:\n  group_size: "eight"\n', ["scheduler.group_size", "integer"]),
    ("out_of_range", b"scheduler:\n  group_size: 0\n", ["scheduler.group_size", "greater than"]),
    ("section_scalar", b"rollout: 8\n", ["rollout:", "dictionary"]),
    ("cross_field", b"scheduler:\n  rollout_batch: 4\n  update_batch: 8\n", ["update_batch"]),
    ("ignored", b"scheduler:\n  policy: sync\n  cache: drop\n", ["cache is set, but policy sync"]),
    ("huge_garbage_line", b"seed: 1\n" + b"x" * (5 * MB) + b"\n", [":3:", "invalid YAML"]),
    ("huge_integer", b"seed: " + b"9" * (5 * MB) + b"\n", ["invalid YAML", "digits"]),
    ("deep_nesting", b"seed: " + b"[" * 100_000 + b"]" * 100_000 + b"\n", ["nested too deeply"]),
]


@pytest.mark.parametrize(("name", "data", "expected"), BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config(tmp_path, name, data, expected):
    p = _write(tmp_path, f"{name}.yaml", data)
    _fails(_load_config, p, ConfigError, *expected)


def test_huge_but_valid_config_lines_load(tmp_path):
    comment = _write(tmp_path, "a.yaml", b"# " + b"x" * (5 * MB) + b"\nseed: 3\n")
    assert _load_config(str(comment)).seed == 3
    long_value = _write(tmp_path, "b.yaml", b"model:\n  path: " + b"m" * (5 * MB) + b"\n")
    assert len(_load_config(str(long_value)).model.path) == 5 * MB


def test_config_directory_and_missing_file(tmp_path):
    _fails(_load_config, _write(tmp_path, "d.yaml", None), ConfigError, "is a directory")
    _fails(_load_config, tmp_path / "nope.yaml", ConfigError, "not found")


# ---------------------------------------------------------------------------- math datasets

BAD_MATH = [
    ("empty.jsonl", b"", ["is empty"]),
    ("blank.jsonl", b"\n  \n\n", ["is empty"]),
    ("latin1.jsonl", OK_MATH + '{"problem": "caf\xe9", "answer": "1"}\n'.encode("latin-1"),
     [":2:", "not valid UTF-8"]),
    ("utf16.jsonl", OK_MATH.decode().encode("utf-16"), [":1:", "not valid UTF-8"]),
    ("no_answer.jsonl", OK_MATH + b'{"problem": "x"}\n', [":2:", "field 'answer'", "missing"]),
    ("no_problem.jsonl", OK_MATH * 2 + b'{"answer": "2"}\n',
     [":3:", "field 'problem'", "missing"]),
    ("problem_int.jsonl", OK_MATH + b'{"problem": 5, "answer": "2"}\n',
     [":2:", "field 'problem'", "must be a string, got int"]),
    ("answer_list.jsonl", b'{"problem": "a", "answer": [2]}\n',
     [":1:", "field 'answer'", "got list"]),
    ("answer_bool.jsonl", b'{"problem": "a", "answer": true}\n', [":1:", "field 'answer'"]),
    ("answer_nan.jsonl", b'{"problem": "a", "answer": NaN}\n',
     [":1:", "field 'answer'", "finite"]),
    ("answer_empty.jsonl", b'{"problem": "a", "answer": "  "}\n',
     [":1:", "field 'answer'", "empty"]),
    ("solution_unboxed.jsonl", b'{"problem": "a", "solution": "it is 2"}\n',
     [":1:", "field 'solution'", "boxed"]),
    ("not_object.jsonl", OK_MATH + b"[1, 2]\n", [":2:", "expected a JSON object"]),
    ("invalid.jsonl", OK_MATH * 2 + b'{"problem": \n', [":3:", "invalid JSON"]),
    ("nul.jsonl", b'{"problem": "1\x00", "answer": "2"}\n', [":1:", "invalid JSON"]),
    ("huge_bad_line.jsonl", OK_MATH + b'{"problem": "' + b"x" * (2 * MB) + b"\n",
     [":2:", "invalid JSON", "Unterminated string"]),
    ("huge_integer.jsonl", b'{"problem": "a", "answer": ' + b"9" * 5000 + b"}\n",
     [":1:", "invalid JSON", "digits"]),
    ("deep.jsonl", OK_MATH + b"[" * 100_000 + b"]" * 100_000 + b"\n",
     [":2:", "nested too deeply"]),
    ("empty.json", b"", ["is empty"]),
    ("latin1.json", '[{"problem": "caf\xe9", "answer": "1"}]'.encode("latin-1"),
     ["not valid UTF-8"]),
    ("invalid.json", b'[\n{"problem": "a", "answer": "1"},\n{"problem": \n]', [":4:", "invalid JSON"]),
    ("object.json", b'{"problem": "a", "answer": "1"}', ["expected a JSON array"]),
    ("missing.json", b'[{"problem": "a", "answer": "1"}, {"problem": "b"}]',
     [":2:", "field 'answer'", "missing"]),
    ("deep.json", b"[" * 100_000 + b"]" * 100_000, ["nested too deeply"]),
]  # fmt: skip


@pytest.mark.parametrize(("name", "data", "expected"), BAD_MATH, ids=[c[0] for c in BAD_MATH])
def test_bad_math_file(tmp_path, name, data, expected):
    p = _write(tmp_path, name, data)
    _fails(load_math_file, p, InputFileError, *expected)


def test_math_huge_valid_line_loads(tmp_path):
    p = _write(tmp_path, "big.jsonl", b'{"problem": "' + b"x" * (2 * MB) + b'", "answer": 2}\n')
    (rec,) = load_math_file(p)
    assert len(rec.problem) == 2 * MB and rec.answer == "2"


def test_math_directory_and_missing_file(tmp_path):
    _fails(load_math_file, _write(tmp_path, "d.jsonl", None), InputFileError, "is a directory")
    _fails(load_math_file, tmp_path / "nope.jsonl", InputFileError, "no such file")


# ---------------------------------------------------------------------------- traces

BAD_TRACES = [
    ("empty", b"", ["holds no prompts"]),
    ("latin1", OK_TRACE + '{"prompt_id": "caf\xe9", "lengths": [1, 2]}\n'.encode("latin-1"),
     [":2:", "not valid UTF-8"]),
    ("no_lengths", OK_TRACE + b'{"prompt_id": "p1"}\n', [":2:", "field 'lengths'", "missing"]),
    ("wrong_type", OK_TRACE + b'{"prompt_id": "p1", "lengths": ["3", 4]}\n',
     [":2:", "field 'lengths'", "element 0"]),
    ("id_type", b'{"prompt_id": 7, "lengths": [3, 4]}\n', [":1:", "field 'prompt_id'"]),
    ("invalid", OK_TRACE + b'{"prompt_id"\n', [":2:", "invalid JSON"]),
    ("huge_integer", b'{"prompt_id": "p", "lengths": [' + b"9" * 5000 + b"]}\n",
     [":1:", "invalid JSON", "digits"]),
    ("deep", b"[" * 100_000 + b"]" * 100_000 + b"\n", [":1:", "nested too deeply"]),
]  # fmt: skip


@pytest.mark.parametrize(("name", "data", "expected"), BAD_TRACES, ids=[c[0] for c in BAD_TRACES])
def test_bad_trace(tmp_path, name, data, expected):
    p = _write(tmp_path, f"{name}.jsonl", data)
    _fails(load_trace, p, InputFileError, *expected)


def test_trace_huge_valid_line_and_bom(tmp_path):
    big = _write(tmp_path, "big.jsonl", b'{"prompt_id": "p", "lengths": [' + b"7, " * MB + b"7]}\n")
    lengths, group = load_trace(str(big))
    assert group == MB + 1 and set(lengths["p"]) == {7}
    bom = _write(tmp_path, "bom.jsonl", b"\xef\xbb\xbf" + OK_TRACE)
    assert load_trace(str(bom)) == ({"p0": [3, 4]}, 2)
    _fails(load_trace, _write(tmp_path, "d.jsonl", None), InputFileError, "Is a directory")


# ---------------------------------------------------------------------------- the CLI


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _cli_fails(args: list[str], *expected: str) -> None:
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    squeezed = "".join(res.output.split())  # the console may wrap long lines anywhere
    for part in expected:
        assert "".join(part.split()) in squeezed, (part, res.output)


def test_simulate_with_bad_trace_keeps_existing_output(tmp_path):
    trace = _write(tmp_path, "t.jsonl", OK_TRACE + "caf\xe9\n".encode("latin-1"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "r.json").write_text('{"precious": true}\n')
    before, trace_before = _snapshot(out), trace.read_bytes()
    _cli_fails(
        ["simulate", "--preset", "test-tiny", "--trace", str(trace), "--json", str(out / "r.json")],
        "t.jsonl:2",
        "not valid UTF-8",
    )
    assert _snapshot(out) == before
    assert trace.read_bytes() == trace_before


def test_train_with_bad_config_keeps_existing_output(tmp_path):
    cfg = _write(tmp_path, "bad.yaml", b'scheduler:\n  group_size: "eight"\n')
    out = tmp_path / "run"
    out.mkdir()
    (out / "summary.json").write_text('{"earlier": "run"}\n')
    (out / "metrics.jsonl").write_text('{"update": 1}\n')
    before = _snapshot(out)
    _cli_fails(
        ["train", "--config", str(cfg), "--out", str(out)], "bad.yaml", "scheduler.group_size"
    )
    assert _snapshot(out) == before
    assert cfg.read_bytes() == b'scheduler:\n  group_size: "eight"\n'


def test_train_with_bad_dataset_keeps_existing_output(tmp_path):
    data = _write(tmp_path, "m.jsonl", OK_MATH + b'{"problem": "x", "answer": [1]}\n')
    cfg = _write(tmp_path, "c.yaml", f"task:\n  name: math\n  path: {data}\n".encode())
    out = tmp_path / "run"
    out.mkdir()
    (out / "summary.json").write_text('{"earlier": "run"}\n')
    before = _snapshot(out)
    _cli_fails(["train", "--config", str(cfg), "--out", str(out)], "m.jsonl:2", "field 'answer'")
    assert _snapshot(out) == before
