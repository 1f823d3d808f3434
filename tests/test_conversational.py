"""Conversational datasets, as TRL has them: a `prompt` column of {role, content} messages is
rendered with the model's chat template, and TRL-style rewards get conversational completions."""

from __future__ import annotations

import json
import sys

import pytest

from sortedrl.errors import ConfigError, InputFileError
from sortedrl.tasks.dataset import DatasetTask
from sortedrl.tasks.user_rewards import load_reward_fns

ALPHABET = "0123456789+= Qwhatis?"
# Renders only the messages' text and the generation cue, so a character tokenizer holds it.
TEMPLATE = (
    "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}={% endif %}"
)


def _rows():
    return [
        {
            "prompt": [
                {"role": "system", "content": "Q"},
                {"role": "user", "content": f"what is {a}+{b}?"},
            ],
            "answer": str(a + b),
        }
        for a in range(5)
        for b in range(5)
    ]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_prompt_column_of_messages_is_read_with_its_messages(tmp_path):
    f = _write(tmp_path / "chat.jsonl", _rows())
    task = DatasetTask(path=str(f), eval_path=str(f))
    (p,) = task.problems("train", 1, seed=0)
    messages = p.meta["messages"]
    assert [m["role"] for m in messages] == ["system", "user"]
    assert p.prompt == "\n".join(f"{m['role']}: {m['content']}" for m in messages)


@pytest.mark.parametrize(
    ("prompt", "words"),
    [
        ([], "an empty list of messages"),
        ([{"role": "user"}], "message 1: needs 'role' and 'content' strings"),
        ([{"role": "user", "content": 3}], "message 1: needs 'role' and 'content' strings"),
        (["hi"], "message 1: needs 'role' and 'content' strings"),
    ],
)
def test_bad_message_lists_name_the_file_line_and_message(tmp_path, prompt, words):
    rows = _rows()
    rows[1]["prompt"] = prompt
    f = _write(tmp_path / "chat.jsonl", rows)
    with pytest.raises(InputFileError, match=rf"chat.jsonl:2: field 'prompt': .*{words}"):
        DatasetTask(path=str(f), eval_path=str(f)).problems("train", 3, seed=0)


def test_messages_go_through_the_chat_template_and_need_one(tmp_path):
    from sortedrl.commands.evaluate import problem_token_ids
    from sortedrl.models.tiny import build_char_tokenizer

    f = _write(tmp_path / "chat.jsonl", _rows())
    (p,) = DatasetTask(path=str(f), eval_path=str(f)).problems("train", 1, seed=0)
    tok = build_char_tokenizer(ALPHABET)
    with pytest.raises(ConfigError, match="list of messages.*chat template"):
        problem_token_ids(tok, p, chat_template=True)
    tok.chat_template = TEMPLATE
    want = tok.apply_chat_template(p.meta["messages"], add_generation_prompt=True, tokenize=True)
    if hasattr(want, "keys"):
        want = want["input_ids"]
    assert problem_token_ids(tok, p, chat_template=True) == list(want)
    with pytest.raises(ConfigError, match="task.chat_template=false"):
        problem_token_ids(tok, p, chat_template=False)


REWARDS = """
def conversational(prompts, completions, **kwargs):
    assert prompts[0][-1]["role"] == "user"
    return [1.0 if c[0]["role"] == "assistant" and c[0]["content"] else 0.0 for c in completions]
"""


@pytest.fixture()
def rewards_module(tmp_path, monkeypatch):
    (tmp_path / "chat_rewards.py").write_text(REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    sys.modules.pop("chat_rewards", None)
    yield
    sys.modules.pop("chat_rewards", None)


def test_conversational_rewards_get_trls_conversational_completions(rewards_module, tmp_path):
    f = _write(tmp_path / "chat.jsonl", _rows())
    (p,) = DatasetTask(path=str(f), eval_path=str(f)).problems("train", 1, seed=0)
    s = load_reward_fns(["chat_rewards:conversational"], None)(p, "4")
    assert s.parts == (("conversational", 1.0, None),)


def test_a_conversational_dataset_trains_end_to_end(rewards_module, tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from sortedrl.commands.train import train
    from sortedrl.config import load_config
    from sortedrl.models.tiny import build_char_tokenizer, build_tiny_model, save_tiny

    tok = build_char_tokenizer(ALPHABET)
    tok.chat_template = TEMPLATE
    save_tiny(build_tiny_model(len(tok), seed=0, size="micro"), tok, tmp_path / "m")
    f = _write(tmp_path / "chat.jsonl", _rows())
    args = [
        f"model.path={tmp_path / 'm'}",
        "task.name=dataset",
        f"task.path={f}",
        f"task.eval_path={f}",
        "task.reward_fns=[chat_rewards:conversational]",
        "task.reward_workers=0",
        "task.train_prompts=8",
        "task.eval_prompts=2",
        "scheduler.group_size=2",
        "rollout.capacity=8",
        "scheduler.max_new_tokens=4",
        "scheduler.update_batch=4",
        "scheduler.rollout_batch=8",
        "max_updates=2",
        "eval.sampled=0",
    ]
    summary = train(load_config(None, args), tmp_path / "run", progress=False)
    assert summary["updates"] == 2 and summary["reward_failures"] == {}
