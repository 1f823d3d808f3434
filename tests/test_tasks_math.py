import json

import pytest

from sortedrl.errors import ConfigError, InputFileError
from sortedrl.tasks.answers import extract_answer, last_boxed, score_response
from sortedrl.tasks.base import Problem
from sortedrl.tasks.math import MathTask, load_eval_set, load_math_file

ROWS = [
    {"problem": "What is 1/2 + 1/4?", "answer": "\\frac{3}{4}"},
    {"question": "Compute 6*7.", "answer": 42},
    {"Problem": "Expand (x+1)^2.", "Answer": "x^2+2x+1"},
    {"problem": "Solve x+1=3.", "solution": "Subtract: $x = \\boxed{2}$."},
    {"problem": "Give the pair.", "answer": "(1,2)", "level": 3},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_load_jsonl(tmp_path):
    f = write_jsonl(tmp_path / "m.jsonl", ROWS)
    recs = load_math_file(f)
    assert [r.answer for r in recs] == ["\\frac{3}{4}", "42", "x^2+2x+1", "2", "(1,2)"]
    assert recs[1].problem == "Compute 6*7."
    assert recs[3].source.endswith("m.jsonl:4")


def test_load_json_array_and_blank_lines(tmp_path):
    f = tmp_path / "m.json"
    f.write_text(json.dumps(ROWS), encoding="utf-8")
    assert len(load_math_file(f)) == len(ROWS)
    g = tmp_path / "m.jsonl"
    g.write_text("\n" + json.dumps(ROWS[0]) + "\n\n  \n" + json.dumps(ROWS[1]), encoding="utf-8")
    assert len(load_math_file(g)) == 2


@pytest.mark.parametrize(
    "content, line, field, words",
    [
        (b'{"problem": "a", "answer": "1"}\n{"answer": "2"}\n', 2, "problem", "missing"),
        (b'{"problem": "a"}\n', 1, "answer", "missing"),
        (b'{"problem": 3, "answer": "1"}\n', 1, "problem", "string"),
        (b'{"problem": "a", "answer": [1]}\n', 1, "answer", "string or a number"),
        (b'{"problem": "a", "answer": null}\n', 1, "answer", "string or a number"),
        (b'{"problem": "a", "answer": ""}\n', 1, "answer", "empty"),
        (b'{"problem": "a", "solution": "no box"}\n', 1, "solution", "boxed"),
        (b'{"problem": "a", "answer": "1"}\n{"problem": "b", answer}\n', 2, None, "invalid JSON"),
        (b"[1, 2]\n", 1, None, "JSON object"),
        (
            b'{"problem": "a", "answer": "1"}\n{"problem": "\xff\xfe", "answer": "1"}\n',
            2,
            None,
            "UTF-8",
        ),
    ],
)
def test_bad_records_name_file_line_field(tmp_path, content, line, field, words):
    f = tmp_path / "bad.jsonl"
    f.write_bytes(content)
    with pytest.raises(InputFileError) as e:
        load_math_file(f)
    msg = str(e.value)
    assert "bad.jsonl" in msg and words in msg
    assert e.value.line == line
    assert e.value.field == field
    if field:
        assert f"'{field}'" in msg


def test_empty_and_missing_files(tmp_path):
    for content in (b"", b"\n\n  \n"):
        f = tmp_path / "empty.jsonl"
        f.write_bytes(content)
        with pytest.raises(InputFileError, match="empty"):
            load_math_file(f)
    with pytest.raises(InputFileError, match="no such file"):
        load_math_file(tmp_path / "nope.jsonl")
    arr = tmp_path / "x.json"
    arr.write_text('{"problem": "a"}')
    with pytest.raises(InputFileError, match="array"):
        load_math_file(arr)
    arr.write_text('[{"problem": "a", "answer": 1}, {"problem": "b"}]')
    with pytest.raises(InputFileError) as e:
        load_math_file(arr)
    assert e.value.line == 2 and e.value.field == "answer"


def test_parquet_needs_pyarrow(tmp_path):
    f = tmp_path / "m.parquet"
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        f.write_bytes(b"PAR1")
        with pytest.raises(InputFileError, match="pyarrow"):
            load_math_file(f)
        return
    pq.write_table(pa.Table.from_pylist([{"problem": "1+1", "answer": "2"}]), str(f))
    assert load_math_file(f)[0].answer == "2"


def test_task_problems_and_splits(tmp_path):
    rows = [{"problem": f"What is {i}+{i}?", "answer": str(2 * i)} for i in range(200)]
    f = write_jsonl(tmp_path / "train.jsonl", rows)
    task = MathTask(path=str(f))
    train = task.problems("train", 50, seed=1)
    assert train == task.problems("train", 50, seed=1)
    test_all = {p.prompt for p in task.problems("test", 500, seed=0)}
    train_all = {p.prompt for p in task.problems("train", 500, seed=0)}
    assert test_all and not test_all & train_all
    assert "\\boxed{}" in train[0].prompt and "What is" in train[0].prompt
    # Separate test file; cycling when asked for more than the file holds.
    g = write_jsonl(tmp_path / "test.jsonl", ROWS)
    task2 = MathTask(path=str(f), eval_path=str(g))
    test = task2.problems("test", 12, seed=0)
    assert len(test) == 12 and len({p.prompt for p in test}) == len(ROWS)
    with pytest.raises(ConfigError):
        MathTask(path=str(f), prompt_template="no placeholder")


def test_eval_sets_by_path(tmp_path):
    f = write_jsonl(tmp_path / "aime.jsonl", [{"ID": "2024-I-1", "Problem": "p", "Answer": 204}])
    probs = load_eval_set("aime24", f)
    assert probs[0].answer == "204" and probs[0].prompt_id == "aime24/0"
    with pytest.raises(ConfigError, match="math500"):
        load_eval_set("gsm8k", f)


def test_extraction():
    assert last_boxed("a \\boxed{1} then \\boxed{\\frac{1}{2}} end") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{\\{1,2\\}}") is not None
    assert last_boxed("\\boxed{unclosed") is None
    assert last_boxed("\\fbox{7}") == "7"
    assert last_boxed("no box") is None
    assert extract_answer("so the answer is $12$.") == "12"
    assert extract_answer("Answer: 7") == "7"
    assert extract_answer("nothing here") is None


def P(answer):
    return Problem("m", "q", answer)


@pytest.mark.parametrize(
    "answer, response, correct",
    [
        ("\\frac{3}{4}", "... so $\\boxed{0.75}$", True),
        ("\\frac{3}{4}", "\\boxed{\\dfrac34}", True),
        ("42", "The answer is 42.", True),
        ("x^2+2x+1", "\\boxed{(x+1)^2}", True),
        ("(1,2)", "\\boxed{(1, 2)}", True),
        ("42", "\\boxed{41}", False),
        ("42", "\\boxed{42} no wait \\boxed{43}", False),
    ],
)
def test_score_math_verify(answer, response, correct):
    s = score_response(P(answer), response)
    assert s.correct is correct and s.format_ok
    assert s.reward == (1.0 if correct else 0.0)


@pytest.mark.parametrize("response", ["", "I don't know", "\\boxed{", "\\boxed{}", "\ud800\udfff"])
def test_score_no_answer(response):
    s = score_response(P("1"), response)
    assert (s.reward, s.correct, s.format_ok) == (0.0, False, False)


def test_task_scores_from_file(tmp_path):
    task = MathTask(
        path=str(write_jsonl(tmp_path / "m.jsonl", ROWS)), eval_path=str(tmp_path / "m.jsonl")
    )
    for p in task.problems("test", 5, seed=0):
        assert task.score(p, f"\\boxed{{{p.answer}}}").correct
        assert not task.score(p, "\\boxed{1234567}").correct
