"""The TRL user's path end to end: their model directory, their data with their own field names
and prompt format, and their TRL-style reward function train with one `sortedrl train` command."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

REWARD_MODULE = '''
def exact_sum(completions, expected, **kwargs):
    """TRL's signature: one float per completion; the dataset's columns arrive by name."""
    return [1.0 if c.strip() == str(e) else 0.0 for c, e in zip(completions, expected)]


def brevity(completions, **kwargs):
    return [-0.01 * len(c) for c in completions]


def one(completions, **kwargs):
    return [1.0 for _ in completions]
'''

ROWS = [{"sum": f"{a}+{b}", "expected": a + b, "source": "gen"} for a in range(6) for b in range(6)]


def _model_dir(path):
    """A user's Hugging Face model directory: a tiny Llama and its tokenizer (no chat template)."""
    from sortedrl.models.tiny import build_char_tokenizer, build_tiny_model, save_tiny

    tokenizer = build_char_tokenizer("0123456789+= Qwhatis?")
    model = build_tiny_model(len(tokenizer), seed=0, size="micro")
    save_tiny(model, tokenizer, path)
    return path


def _data(tmp_path, kind):
    if kind == "jsonl":
        f = tmp_path / "sums.jsonl"
        f.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
        return f
    datasets = pytest.importorskip("datasets")
    dd = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(ROWS[:8])}
    )
    dd.save_to_disk(str(tmp_path / "sums"))
    return tmp_path / "sums"


@pytest.mark.parametrize("kind", ["jsonl", "saved_dataset"])
def test_own_model_data_and_trl_reward_train_in_one_command(tmp_path, monkeypatch, kind):
    from click.testing import CliRunner

    from sortedrl.cli import main

    (tmp_path / "user_rewards_mod.py").write_text(REWARD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # the reward workers import it too
    model = _model_dir(tmp_path / "my-model")
    data = _data(tmp_path, kind)
    out = tmp_path / "run"
    res = CliRunner().invoke(
        main,
        [
            "train",
            "--out",
            str(out),
            "--model",
            str(model),
            "--no-progress",
            "task.name=dataset",
            f"task.path={data}",
            "task.prompt_key=sum",
            "task.answer_key=expected",
            "task.prompt_template=Q what is {problem}?=",
            "task.reward_fns=[user_rewards_mod:exact_sum, user_rewards_mod:brevity]",
            "task.reward_weights=[1.0, 0.5]",
            "task.train_prompts=48",
            "task.eval_prompts=4",
            "scheduler.group_size=2",
            "rollout.capacity=8",
            "scheduler.max_new_tokens=4",
            "scheduler.update_batch=4",
            "scheduler.rollout_batch=8",
            "max_updates=3",
            "eval.sampled=0",
        ],
    )
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "summary.json").read_text())
    assert doc["updates"] == 3
    assert doc["config"]["task"]["reward_fns"] == [
        "user_rewards_mod:exact_sum",
        "user_rewards_mod:brevity",
    ]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    # Rewards came from the user's functions: the brevity term makes them negative unless the
    # sum was right, and no scoring call failed.
    assert all(-0.5 * 0.01 * 4 - 1e-9 <= x["reward_mean"] <= 1.0 for x in lines)
    assert any(x["reward_mean"] < 0 for x in lines)
    # 36 records (or the DatasetDict's 36 train rows), 12 prompts trained: a third of an epoch.
    train_records = 36 if kind == "saved_dataset" else doc["train_records"]
    assert doc["train_records"] == train_records
    assert doc["epochs"] == pytest.approx(12 / train_records)
    assert lines[-1]["epoch"] == pytest.approx(doc["epochs"])
    assert (out / "model" / "config.json").is_file()


def test_eval_command_takes_the_dataset_task_settings(tmp_path, monkeypatch):
    """`sortedrl eval` on the user's data: their keys, template and weighted reward functions."""
    from click.testing import CliRunner

    from sortedrl.cli import main

    (tmp_path / "user_rewards_mod.py").write_text(REWARD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    model = _model_dir(tmp_path / "my-model")
    data = _data(tmp_path, "jsonl")
    scores = tmp_path / "scores.json"
    args = ["eval", "--model", str(model), "--task", "dataset", "--path", str(data)]
    keys = ["--prompt-key", "sum", "--answer-key", "expected"]
    rest = ["--prompt-template", "Q what is {problem}?=", "--no-chat-template", "--prompts", "4"]
    rewards = ["--reward-fns", "user_rewards_mod:one", "--reward-weights", "2.0"]
    cap = ["--max-new-tokens", "4", "--capacity", "8", "--json", str(scores)]
    res = CliRunner().invoke(main, [*args, *keys, *rest, *rewards, *cap])
    assert res.exit_code == 0, res.output
    doc = json.loads(scores.read_text())
    assert doc["problems"] == 4 and doc["reward_mean"] == pytest.approx(2.0)
    # Without the keys the default columns are missing: the error names the file and field.
    res = CliRunner().invoke(main, [*args, *rest, *cap])
    assert res.exit_code == 2 and "'problem'" in res.output, res.output
    assert "task.prompt_key" in res.output


def test_epochs_over_a_file_feed_the_length_history_of_each_record(tmp_path, monkeypatch):
    """Two passes over a 6-record file: each admission has its own prompt id and epoch, and
    the controller's length history is keyed on the record, so epoch 1 predicts from epoch 0."""
    from click.testing import CliRunner

    from sortedrl.cli import main

    (tmp_path / "user_rewards_mod.py").write_text(REWARD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    data = tmp_path / "sums.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS[:6]))
    out = tmp_path / "run"
    settings = [
        "task.name=dataset",
        f"task.path={data}",
        f"task.eval_path={data}",
        "task.prompt_key=sum",
        "task.answer_key=expected",
        "task.reward_fns=[user_rewards_mod:exact_sum]",
        "task.reward_workers=0",
        "task.train_prompts=12",
        "task.eval_prompts=2",
        "scheduler.group_size=2",
        "rollout.capacity=8",
        "scheduler.max_new_tokens=6",
        "scheduler.update_batch=2",
        "scheduler.rollout_batch=4",
        "scheduler.submit_order=longest_predicted",
        "checkpoint.every_updates=0",
        "eval.sampled=0",
    ]
    model = _model_dir(tmp_path / "my-model")
    args = ["train", "--out", str(out), "--model", str(model), "--no-progress", *settings]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "summary.json").read_text())
    assert doc["train_records"] == 6 and doc["epochs"] == pytest.approx(2.0)
    (ckpt,) = (out / "checkpoints").iterdir()
    state = json.loads((ckpt / "controller.json").read_text())
    history = state["lengths"]["history"]["by_prompt"]
    # 12 admissions, 6 records: one history per record, holding the responses of both epochs
    # (more where a response was discarded and generated again).
    assert len(history) == 6 and all(k.startswith("rec/") for k in history)
    assert all(len(v) >= 2 * 2 for v in history.values())
    assert sum(len(v) for v in history.values()) >= 12 * 2
