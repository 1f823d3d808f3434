"""Length specs, trace files and the Workload lookup rules."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest

from sortedrl.errors import ConfigError, InputFileError
from sortedrl.workload import (
    Workload,
    default_lengths_spec,
    load_trace,
    parse_lengths_spec,
)

CAP = 16384


def _lengths(spec: str, prompts: int = 2000, group: int = 8, cap: int = CAP, seed: int = 0):
    w = Workload.from_spec(spec, cap, group, (f"p{i}" for i in range(prompts)), seed=seed)
    return w, [x for pid in w.prompt_ids() for x in w.group(pid)]


# --- specs ---------------------------------------------------------------------------------------


def test_single_lognormal_has_its_median():
    _, xs = _lengths("lognormal:median=900,sigma=0.6")
    assert 800 < statistics.median(xs) < 1000
    assert all(1 <= x <= CAP for x in xs)


def test_mixture_weights_are_normalised_and_give_a_long_tail():
    spec = "0.8*lognormal:median=900,sigma=0.6+0.2*lognormal:median=9000,sigma=0.5"
    d = parse_lengths_spec(spec, CAP)
    assert [t.weight for t in d.terms] == pytest.approx([0.8, 0.2])
    d2 = parse_lengths_spec(spec.replace("0.8*", "4*").replace("0.2*", "1*"), CAP)
    assert [t.weight for t in d2.terms] == pytest.approx([0.8, 0.2])
    _, xs = _lengths(spec)
    long_share = sum(x > 4000 for x in xs) / len(xs)
    assert 0.15 < long_share < 0.25


def test_exponent_notation_is_not_a_term_separator():
    d = parse_lengths_spec("lognormal:median=1e+3,sigma=0.5", CAP)
    assert len(d.terms) == 1 and math.exp(d.terms[0].a) == pytest.approx(1000)


def test_cap_truncates_and_minimum_is_one():
    _, xs = _lengths("lognormal:median=500,sigma=3", cap=2000)
    assert max(xs) == 2000 and min(xs) >= 1
    assert any(x == 1 for x in xs)  # sigma 3 reaches below 0.5 tokens


def test_fixed_and_uniform():
    _, xs = _lengths("fixed:length=77", prompts=50)
    assert set(xs) == {77}
    _, xs = _lengths("uniform:min=10,max=20", prompts=200)
    assert set(xs) == set(range(10, 21))


def test_prompt_sigma_correlates_a_group():
    def spread_of_group_means(spec: str) -> float:
        w, _ = _lengths(spec, prompts=1000)
        return statistics.pstdev(
            statistics.mean(math.log(x) for x in w.group(p)) for p in w.prompt_ids()
        )

    independent = spread_of_group_means("lognormal:median=1000,sigma=0.8")
    correlated = spread_of_group_means("lognormal:median=1000,sigma=0.8,prompt_sigma=0.8")
    assert independent == pytest.approx(0.8 / math.sqrt(8), rel=0.15)
    assert correlated > 2.5 * independent


@pytest.mark.parametrize(
    "spec, needle",
    [
        ("", "empty"),
        ("gamma:shape=2", "unknown distribution 'gamma'"),
        ("lognormal:median=900", "missing parameter(s) sigma"),
        ("lognormal:median=900,sigma=x", "sigma='x' is not a number"),
        ("lognormal:median=900,sigma=-1", "sigma must be >= 0"),
        ("lognormal:median=0,sigma=1", "median must be positive"),
        ("lognormal:median=900,sigma=1,mean=3", "unknown parameter 'mean'"),
        ("lognormal:median=900,sigma=1,sigma=2", "given twice"),
        ("lognormal:median=900,sigma=1,prompt_sigma=-1", "prompt_sigma must be >= 0"),
        ("lognormal", "expected 'lognormal:name=value"),
        ("lognormal:median", "expected name=value"),
        ("0*lognormal:median=9,sigma=1", "weight must be positive"),
        ("abc*lognormal:median=9,sigma=1", "weight 'abc' is not a number"),
        ("lognormal:median=9,sigma=1+0.5*fixed:length=3", "needs a weight"),
        ("fixed:length=2.5", "positive integer"),
        ("uniform:min=5,max=2", "1 <= min <= max"),
        ("0.5*fixed:length=3+", "empty term"),
    ],
)
def test_bad_specs_say_what_is_wrong(spec: str, needle: str):
    with pytest.raises(ConfigError) as e:
        parse_lengths_spec(spec, CAP)
    assert needle in str(e.value)


def test_default_spec_is_long_tailed_for_16k():
    spec = default_lengths_spec(CAP)
    _, xs = _lengths(spec, prompts=3000)
    xs.sort()
    n = len(xs)
    assert 1000 < xs[n // 2] < 4000  # median
    assert 0.5 < sum(1000 <= x <= 4000 for x in xs) / n
    at_cap = sum(x == CAP for x in xs) / n
    assert 0.01 < at_cap < 0.05  # a few percent hit the cap
    assert 2500 < statistics.mean(xs) < 4500
    # Smaller caps scale the same shape.
    _, small = _lengths(default_lengths_spec(1024), prompts=500, cap=1024)
    assert max(small) == 1024 and 50 < statistics.median(small) < 300


# --- determinism and regeneration --------------------------------------------------------------


def test_lengths_are_deterministic_and_order_independent():
    spec = default_lengths_spec(CAP)
    a = Workload.from_spec(spec, CAP, 8, ["p1", "p2", "p3"], seed=5)
    b = Workload.from_spec(spec, CAP, 8, ["p3", "p2"], seed=5)  # p1 drawn lazily
    c = Workload.from_spec(spec, CAP, 8, ["p1", "p2", "p3"], seed=6)
    for pid in ["p1", "p2", "p3"]:
        assert a.group(pid) == b.group(pid)
    assert any(a.group(p) != c.group(p) for p in ["p1", "p2", "p3"])
    assert len(b) == 3


def test_regenerated_responses_draw_from_their_prompt():
    w = Workload.from_spec("lognormal:median=1000,sigma=1", CAP, 8, ["p"], seed=1)
    group = w.group("p")
    assert [w.length("p", i, 0) for i in range(8)] == group
    regen = [w.length("p", i, a) for i in range(8) for a in range(1, 20)]
    assert set(regen) <= set(group)
    assert len(set(regen)) > 3  # not always the same sample
    assert regen == [w.length("p", i, a) for i in range(8) for a in range(1, 20)]
    with pytest.raises(ConfigError, match="sample_index 8 out of range"):
        w.length("p", 8, 0)


def test_building_many_prompts_draws_each_once():
    # Its speed is part of benchmarks/bench_simulator.py (no wall-clock bound in tests).
    w = Workload.from_spec(default_lengths_spec(CAP), CAP, 8, (f"p{i}" for i in range(25_000)))
    assert len(w) == 25_000
    assert w.group("p24999") == w.group("p24999")


# --- traces -------------------------------------------------------------------------------------


def _write(tmp_path: Path, lines: list[str]) -> str:
    p = tmp_path / "trace.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return str(p)


def test_load_trace_and_workload(tmp_path: Path):
    path = _write(
        tmp_path,
        [
            json.dumps({"prompt_id": "p17", "lengths": [812, 20000, 5]}),
            "",
            "   ",
            json.dumps({"prompt_id": "p18", "lengths": [1, 2, 3], "extra": "ignored"}),
        ],
    )
    lengths, g = load_trace(path)
    assert g == 3 and lengths == {"p17": [812, 20000, 5], "p18": [1, 2, 3]}
    w = Workload.from_trace(path, cap=CAP, seed=3)
    assert w.group_size == 3
    assert w.length("p17", 1, 0) == CAP  # capped
    assert w.length("p18", 2, 0) == 3
    assert w.length("p18", 0, 4) in {1, 2, 3}
    with pytest.raises(ConfigError, match="prompt 'nope' is not in the workload"):
        w.length("nope", 0, 0)


@pytest.mark.parametrize(
    "lines, line, field, needle",
    [
        (['{"prompt_id": "a", "lengths": [1]', ""], 1, None, "invalid JSON"),
        (["[1, 2]"], 1, None, "expected a JSON object"),
        (['{"lengths": [1]}'], 1, "prompt_id", "missing"),
        (['{"prompt_id": 7, "lengths": [1]}'], 1, "prompt_id", "non-empty string"),
        (['{"prompt_id": "", "lengths": [1]}'], 1, "prompt_id", "non-empty string"),
        (
            ['{"prompt_id": "a", "lengths": [1]}', "", '{"prompt_id": "a", "lengths": [2]}'],
            3,
            "prompt_id",
            "duplicate prompt_id 'a'",
        ),
        (['{"prompt_id": "a"}'], 1, "lengths", "missing"),
        (['{"prompt_id": "a", "lengths": []}'], 1, "lengths", "non-empty list"),
        (['{"prompt_id": "a", "lengths": 5}'], 1, "lengths", "non-empty list"),
        (['{"prompt_id": "a", "lengths": [1, 2.5]}'], 1, "lengths", "element 1"),
        (['{"prompt_id": "a", "lengths": ["3"]}'], 1, "lengths", "element 0"),
        (['{"prompt_id": "a", "lengths": [true]}'], 1, "lengths", "element 0"),
        (['{"prompt_id": "a", "lengths": [4, -1]}'], 1, "lengths", "positive integer"),
        (['{"prompt_id": "a", "lengths": [0]}'], 1, "lengths", "positive integer"),
        (
            ['{"prompt_id": "a", "lengths": [1, 2]}', '{"prompt_id": "b", "lengths": [1]}'],
            2,
            "lengths",
            "group of 1 responses, but line 1 has 2",
        ),
    ],
)
def test_bad_trace_names_file_line_and_field(
    tmp_path: Path, lines: list[str], line: int, field: str | None, needle: str
):
    path = _write(tmp_path, lines)
    with pytest.raises(InputFileError) as e:
        load_trace(path)
    msg = str(e.value)
    assert f"{path}:{line}:" in msg
    assert needle in msg
    assert e.value.line == line and e.value.field == field
    if field:
        assert f"field '{field}'" in msg


def test_empty_or_missing_trace(tmp_path: Path):
    with pytest.raises(InputFileError, match="no prompts"):
        load_trace(_write(tmp_path, ["", ""]))
    with pytest.raises(InputFileError, match="cannot read"):
        load_trace(str(tmp_path / "missing.jsonl"))


def test_later_epochs_draw_afresh_from_each_prompts_own_distribution():
    spec = "lognormal:median=1000,sigma=0.2,prompt_sigma=1.0"
    ids = [f"p{i}" for i in range(200)]
    w = Workload.from_spec(spec, 16384, 8, ids, seed=3)
    first = {p: w.epoch_group(p, 0) for p in ids}
    again = {p: w.epoch_group(p, 1) for p in ids}
    assert all(w.length(p, i, 0, 0) == first[p][i] for p in ids[:5] for i in range(8))
    assert all(w.length(p, i, 0, 1) == again[p][i] for p in ids[:5] for i in range(8))
    assert sum(first[p] != again[p] for p in ids) > 190  # not the same lengths again ...

    def log_mean(xs):
        return sum(math.log(x) for x in xs) / len(xs)

    # ... but the same prompts are long: the prompt's offset (sigma 1.0) outweighs the
    # samples' (0.2), so the groups' log-means agree closely across epochs.
    a = [log_mean(first[p]) for p in ids]
    b = [log_mean(again[p]) for p in ids]
    assert statistics.correlation(a, b) > 0.9
    assert Workload.from_spec(spec, 16384, 8, ids, seed=3).epoch_group("p7", 2) == w.epoch_group(
        "p7", 2
    )  # deterministic
    with pytest.raises(ConfigError, match="epoch must be >= 0"):
        w.length("p1", 0, 0, -1)


def test_trace_epochs_draw_from_the_recorded_lengths(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"prompt_id": "a", "lengths": [5, 6, 7]}\n')
    w = Workload.from_trace(str(path), 100)
    assert w.epoch_group("a", 0) == [5, 6, 7]
    later = [x for e in range(1, 30) for x in w.epoch_group("a", e)]
    assert set(later) == {5, 6, 7}
    assert w.length("a", 1, 2, 4) in {5, 6, 7}
