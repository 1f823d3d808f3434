"""The dataset task: your files, field names and prompt format; epochs; both reward signatures."""

from __future__ import annotations

import json
import sys

import pytest

from sortedrl.config import load_config
from sortedrl.errors import ConfigError, InputFileError
from sortedrl.tasks.base import Problem
from sortedrl.tasks.dataset import DatasetTask, score_answer
from sortedrl.tasks.registry import build_task
from sortedrl.tasks.scoring import make_scorer
from sortedrl.tasks.user_rewards import RewardFailure, TRLReward, WeightedReward, load_reward_fns

ROWS = [
    {"q": "12+7=", "gold": "19", "difficulty": 1},
    {"q": "3+4=", "gold": 7, "difficulty": 0},
    {"q": "30+12=", "gold": "42", "difficulty": 2},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def cfg_for(path, *extra):
    return load_config(
        None, ["task.name=dataset", f"task.path={path}", "task.prompt_key=q", *extra]
    ).task


def test_own_field_names_and_raw_prompt(tmp_path):
    f = write_jsonl(tmp_path / "add.jsonl", ROWS)
    task = build_task(cfg_for(f, "task.answer_key=gold", "task.eval_path=" + str(f)))
    probs = task.problems("train", 3, seed=0)
    assert sorted(p.prompt for p in probs) == ["12+7=", "3+4=", "30+12="]
    by_prompt = {p.prompt: p for p in probs}
    assert by_prompt["3+4="].answer == "7"  # a number becomes text
    # Every column but the prompt's stays with the problem, for TRL-style rewards.
    assert by_prompt["12+7="].meta["columns"] == {"gold": "19", "difficulty": 1}


def test_prompt_template_from_a_config_file(tmp_path):
    f = write_jsonl(tmp_path / "add.jsonl", ROWS)
    conf = tmp_path / "c.yaml"
    conf.write_text(
        f"task:\n  name: dataset\n  path: {f}\n  eval_path: {f}\n  prompt_key: q\n"
        f"  answer_key: gold\n  prompt_template: 'Q: {{problem}}\n\n    A:'\n"
    )
    task = build_task(load_config(str(conf), []).task)
    assert {p.prompt for p in task.problems("train", 3, 0)} == {
        "Q: 12+7=\nA:",
        "Q: 3+4=\nA:",
        "Q: 30+12=\nA:",
    }
    with pytest.raises(ConfigError, match="prompt_template must contain"):
        load_config(None, ["task.name=dataset", f"task.path={f}", "task.prompt_template=Q"])


def test_math_is_the_dataset_task_with_its_prompt(tmp_path):
    f = write_jsonl(tmp_path / "m.jsonl", [{"problem": "1+1?", "answer": "2"}])
    cfg = load_config(None, ["task.name=math", f"task.path={f}", f"task.eval_path={f}"]).task
    (p,) = build_task(cfg).problems("train", 1, 0)
    assert p.prompt.startswith("1+1?\nPlease reason step by step")
    conf = tmp_path / "raw.yaml"  # an empty template: the problem as it is
    conf.write_text(f"task:\n  name: math\n  path: {f}\n  eval_path: {f}\n  prompt_template: ''\n")
    raw = load_config(str(conf), []).task
    assert build_task(raw).problems("train", 1, 0)[0].prompt == "1+1?"


def test_epochs_are_recorded_when_the_file_is_smaller_than_train_prompts(tmp_path):
    f = write_jsonl(tmp_path / "add.jsonl", ROWS)
    task = DatasetTask(path=str(f), eval_path=str(f), prompt_key="q", answer_key="gold")
    probs = task.problems("train", 7, seed=3)
    # 3 records, 7 prompts: epochs 0, 0, 0, 1, 1, 1, 2, each epoch a permutation of the file.
    assert [p.meta["epoch"] for p in probs] == [0, 0, 0, 1, 1, 1, 2]
    assert sorted(p.prompt for p in probs[:3]) == sorted(p.prompt for p in probs[3:6])
    assert len({p.prompt_id for p in probs}) == 7
    assert task.num_records("train") == 3


def test_default_verifier_reads_a_plain_answer_on_the_last_line():
    p = Problem("x", "12+7=", "19")
    assert score_answer(p, "19").correct
    assert score_answer(p, "let me think\n19\n").correct
    assert score_answer(p, "The answer is 19.").correct
    assert not score_answer(p, "18").correct
    # Words are compared as text: math-verify would read "abc" as a*b*c, equal to c*b*a.
    assert not score_answer(Problem("y", "reverse abc", "cba"), "abc").correct
    assert score_answer(Problem("y", "capital of France?", "Paris"), "paris").correct
    # math asks for \boxed{}: an unmarked answer is no answer there.
    assert not score_answer(p, "19", last_line=False).format_ok


@pytest.mark.parametrize(
    "rows, line, field, words",
    [
        ([{"q": "1+1=", "gold": "2"}, {"gold": "3"}], 2, "q", "missing (task.prompt_key)"),
        ([{"q": 5, "gold": "2"}], 1, "q", "must be a string, got int"),
        ([{"q": "1+1="}], 1, "gold", "missing (task.answer_key)"),
        ([{"q": "1+1=", "gold": [2]}], 1, "gold", "string or a number"),
    ],
)
def test_bad_records_name_file_line_and_field(tmp_path, rows, line, field, words):
    f = write_jsonl(tmp_path / "bad.jsonl", rows)
    task = DatasetTask(path=str(f), eval_path=str(f), prompt_key="q", answer_key="gold")
    with pytest.raises(InputFileError) as e:
        task.problems("train", 1, 0)
    assert f"bad.jsonl:{line}: field '{field}': " in str(e.value) and words in str(e.value)


def test_answer_may_be_absent_when_your_rewards_need_none(tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", [{"q": "write a haiku"}])
    cfg = cfg_for(f, f"task.eval_path={f}", "task.reward_fns=[mod:fn]")
    task = build_task(cfg)
    assert task.problems("train", 1, 0)[0].answer == ""
    with pytest.raises(InputFileError, match="field 'answer': missing"):
        build_task(cfg_for(f, f"task.eval_path={f}")).problems("train", 1, 0)


def test_parquet(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    f = tmp_path / "add.parquet"
    pq.write_table(pa.Table.from_pylist([{"q": r["q"], "gold": str(r["gold"])} for r in ROWS]), f)
    task = DatasetTask(path=str(f), eval_path=str(f), prompt_key="q", answer_key="gold")
    assert sorted(p.answer for p in task.problems("train", 3, 0)) == ["19", "42", "7"]


def test_saved_dataset_dict_gives_train_and_test_splits(tmp_path):
    datasets = pytest.importorskip("datasets")
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list([{"q": "1+1=", "gold": "2"}] * 4),
            "test": datasets.Dataset.from_list([{"q": "2+2=", "gold": "4"}]),
        }
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    task = DatasetTask(path=str(tmp_path / "dd"), prompt_key="q", answer_key="gold")
    assert {p.prompt for p in task.problems("train", 4, 0)} == {"1+1="}
    assert [p.prompt for p in task.problems("test", 1, 0)] == ["2+2="]
    assert task.num_records("train") == 4
    only_train = datasets.DatasetDict({"train": datasets.Dataset.from_list([{"q": "1="}] * 2)})
    only_train.save_to_disk(str(tmp_path / "dd2"))
    held_out = DatasetTask(path=str(tmp_path / "dd2"), eval_path=str(tmp_path / "dd2"))
    with pytest.raises(InputFileError, match=r"dd2: has no 'test' or 'validation' split"):
        held_out.problems("test", 1, 0)
    # A single saved Dataset is read as it is; a record number names a bad row.
    datasets.Dataset.from_list([{"q": "1=", "gold": "1"}, {"q": "", "gold": "2"}]).save_to_disk(
        str(tmp_path / "one")
    )
    one = str(tmp_path / "one")
    bad = DatasetTask(path=one, eval_path=one, prompt_key="q", answer_key="gold")
    with pytest.raises(InputFileError, match=r"one:2: field 'q': is empty"):
        bad.problems("train", 1, 0)


def test_config_errors():
    with pytest.raises(ConfigError, match="needs task.path"):
        load_config(None, ["task.name=dataset"])
    with pytest.raises(ConfigError, match="prompt_key: only the math and dataset tasks"):
        load_config(None, ["task.prompt_key=q"])
    with pytest.raises(ConfigError, match="reward_fn is now reward_fns"):
        load_config(None, ["task.reward_fn=mod:fn"])
    with pytest.raises(ConfigError, match="reward_weights has 1 entries for 2 reward_fns"):
        load_config(
            None, ["task.reward_fns=[a:b, c:d]", "task.reward_weights=[1.0]", "task.name=reverse"]
        )


# --- reward functions in both signatures ---------------------------------------------------

REWARD_MODULE = '''
CALLS = []

def trl_exact(completions, gold, **kwargs):
    """TRL style: lists in, a list out; the dataset's columns arrive by name."""
    CALLS.append(sorted(kwargs))
    return [1.0 if c.strip() == str(g) else 0.0 for c, g in zip(completions, gold)]

def trl_short(completions, **kwargs):
    return [None if c == "skip" else -0.01 * len(c) for c in completions]

def own(problem, response):
    return 0.5 if response.strip() == problem.answer else 0.0

def trl_bad(completions, **kwargs):
    return 1.0

def no_signature(x):
    return 0.0
'''


@pytest.fixture()
def reward_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(REWARD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # the sandbox's workers import it too
    sys.modules.pop("my_rewards", None)
    yield
    sys.modules.pop("my_rewards", None)


def test_trl_reward_gets_prompts_completions_and_columns(reward_module):
    import my_rewards

    p = Problem("x", "12+7=", "19", meta={"columns": {"gold": "19", "difficulty": 1}})
    assert TRLReward(my_rewards.trl_exact)(p, "19") == 1.0
    assert my_rewards.CALLS[-1] == ["difficulty", "prompts"]
    with pytest.raises(RewardFailure, match="returns a list") as e:
        TRLReward(my_rewards.trl_bad)(p, "19")
    assert e.value.kind == "wrong_type"


def test_weighted_sum_of_both_signatures(reward_module):
    fns = load_reward_fns(
        ["my_rewards:trl_exact", "my_rewards:own", "my_rewards:trl_short"], [1.0, 2.0, 10.0]
    )
    assert isinstance(fns, WeightedReward)
    p = Problem("x", "12+7=", "19", meta={"columns": {"gold": "19"}})
    # 1 * 1.0 + 2 * 0.5 + 10 * (-0.01 * 2) = 1.8
    s = fns(p, "19")
    assert s.reward == pytest.approx(1.8) and s.correct
    # A None (not applicable) adds nothing: 1 * 0 + 2 * 0 + nothing.
    skipped = fns(p, "skip")
    assert (skipped.reward, skipped.correct, skipped.format_ok) == (0.0, False, True)
    assert skipped.parts == (
        ("trl_exact", 0.0, None),
        ("own", 0.0, None),
        ("trl_short", None, None),
    )
    # Partial credit is not correctness: with a task to judge, its verifier decides.
    partial = load_reward_fns(["my_rewards:trl_short"], None, judge=DatasetTask(path="unused"))
    assert partial(p, "18").reward < 0 and not partial(p, "18").correct
    assert partial(p, "19").correct
    with pytest.raises(ConfigError, match=r"takes \(x\)"):
        load_reward_fns(["my_rewards:no_signature"], None)


def test_user_rewards_run_in_the_sandbox(reward_module, tmp_path):
    f = write_jsonl(tmp_path / "add.jsonl", ROWS)
    cfg = cfg_for(
        f,
        "task.answer_key=gold",
        f"task.eval_path={f}",
        "task.reward_fns=[my_rewards:trl_exact]",
        "task.reward_timeout_s=20",
    )
    task = build_task(cfg)
    scorer = make_scorer(cfg, task)
    try:
        assert scorer.n_workers == 2  # untrusted code: worker processes, hard time limit
        probs = {p.prompt: p for p in task.problems("train", 3, 0)}
        got = scorer.score_batch([(probs["12+7="], "19"), (probs["3+4="], "8")])
        assert [s.reward for s in got] == [1.0, 0.0]
    finally:
        scorer.close()
