"""What is wrong with your model, data or settings is found before any work is done or any
earlier run is removed: a model without a tokenizer, a context too short for the prompts and
responses, a bad setting under --overwrite."""

from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from sortedrl.config import load_config  # noqa: E402
from sortedrl.errors import ConfigError  # noqa: E402

ALPHABET = "0123456789+= Qwhatis?"


def _model(path, kind, positions=128, tokenizer=True):
    """A user's model directory: a tiny Qwen2, GPT-2 or Llama with `positions` positions."""
    from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

    from sortedrl.models.tiny import build_char_tokenizer, build_tiny_model

    tok = build_char_tokenizer(ALPHABET)
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    if kind == "qwen2":
        cfg = Qwen2Config(
            vocab_size=len(tok),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=positions,
            pad_token_id=tok.pad_token_id,
            **ids,
        )
        model = Qwen2ForCausalLM(cfg)
    elif kind == "gpt2":
        cfg = GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=1, n_head=2, n_positions=positions)
        cfg.update(ids)
        model = GPT2LMHeadModel(cfg)
    else:
        model = build_tiny_model(len(tok), seed=0, size="micro", max_position_embeddings=positions)
    model.save_pretrained(path)
    if tokenizer:
        tok.save_pretrained(path)
    return path


def _data(tmp_path, long_line=None):
    rows = [{"sum": f"{a}+{b}", "expected": a + b} for a in range(6) for b in range(6)]
    if long_line is not None:
        rows.insert(long_line - 1, {"sum": "1+" * 170 + "1", "expected": 171})
    f = tmp_path / "sums.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f


def _args(model, data, *more):
    return [
        f"model.path={model}",
        "task.name=dataset",
        f"task.path={data}",
        "task.prompt_key=sum",
        "task.answer_key=expected",
        "task.train_prompts=16",
        "task.eval_prompts=4",
        "scheduler.group_size=2",
        "rollout.capacity=8",
        "scheduler.max_new_tokens=4",
        "scheduler.update_batch=4",
        "scheduler.rollout_batch=8",
        "max_updates=1",
        "eval.sampled=0",
        *more,
    ]


@pytest.mark.parametrize("kind", ["qwen2", "gpt2", "llama"])
def test_a_model_directory_without_a_tokenizer_is_named(tmp_path, kind):
    from sortedrl.commands.prepare import prepare_model

    model = _model(tmp_path / "m", kind, tokenizer=False)
    cfg = load_config(None, _args(model, _data(tmp_path)))
    with pytest.raises(ConfigError, match=rf"model.path: {model} has no tokenizer"):
        prepare_model(cfg, None)


@pytest.mark.parametrize("kind", ["qwen2", "gpt2"])
def test_responses_that_do_not_fit_the_context_are_refused_before_any_work(tmp_path, kind):
    from sortedrl.commands.train import train

    model = _model(tmp_path / "m", kind, positions=128)
    cfg = load_config(None, _args(model, _data(tmp_path), "scheduler.max_new_tokens=200"))
    with pytest.raises(ConfigError, match=r"scheduler.max_new_tokens=200 .* 128 positions"):
        train(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_prompt_too_long_names_its_file_and_line_or_is_dropped_and_counted(tmp_path, capsys):
    from sortedrl.commands.train import train

    model = _model(tmp_path / "m", "qwen2", positions=128)
    data = _data(tmp_path, long_line=3)
    cfg = load_config(None, _args(model, data, f"task.eval_path={data}"))
    with pytest.raises(ConfigError, match=rf"{data}:3: the prompt's \d+ tokens"):
        train(cfg, tmp_path / "run", progress=False)
    cfg = load_config(
        None,
        _args(model, data, f"task.eval_path={data}", "task.long_prompts=drop"),
    )
    summary = train(cfg, tmp_path / "run2", progress=False)
    assert summary["prompts_too_long"]["train"] >= 1 and summary["prompts_too_long"]["eval"] >= 0
    assert "task.long_prompts=drop: dropped" in capsys.readouterr().out


def test_eval_refuses_a_max_new_tokens_past_the_context(tmp_path):
    from click.testing import CliRunner

    from sortedrl.cli import main

    model = _model(tmp_path / "m", "gpt2", positions=128)
    args = ["eval", "--model", str(model), "--task", "dataset", "--path", str(_data(tmp_path))]
    args += ["--prompt-key", "sum", "--answer-key", "expected", "--prompts", "2"]
    res = CliRunner().invoke(main, [*args, "--max-new-tokens", "200"])
    assert res.exit_code == 2, res.output
    assert "--max-new-tokens 200" in res.output and "128 positions" in res.output


def test_overwrite_validates_everything_before_it_removes_the_whole_previous_run(tmp_path):
    from sortedrl.commands.train import train

    model = _model(tmp_path / "m", "llama", positions=512)
    data = _data(tmp_path)
    out = tmp_path / "run"
    train(load_config(None, _args(model, data)), out, progress=False)
    before = sorted(os.listdir(out))
    assert "report.png" in before and "checkpoints" in before
    bad = _args(model, data, "task.reward_fns=[no_such_module_here:fn]")
    with pytest.raises(ConfigError, match="no_such_module_here"):
        train(load_config(None, bad), out, progress=False, overwrite=True)
    assert sorted(os.listdir(out)) == before  # nothing removed
    too_long = _args(model, data, "scheduler.max_new_tokens=600")
    with pytest.raises(ConfigError, match="max_new_tokens"):
        train(load_config(None, too_long), out, progress=False, overwrite=True)
    assert sorted(os.listdir(out)) == before
    # report.png is part of a run: a folder holding one is a previous run, and --overwrite
    # removes it with the rest.
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "report.png").write_bytes(b"stale")
    with pytest.raises(ConfigError, match=r"previous run \(report.png\)"):
        train(load_config(None, _args(model, data)), lone, progress=False)
    from sortedrl.commands.train import claim_out_dir

    claim_out_dir(lone, resume=False, overwrite=True)
    assert os.listdir(lone) == []


def test_the_model_of_an_embedded_model_run_is_not_held_to_its_nominal_positions(tmp_path):
    """As in training, `eval` does not check the embedded tiny model's (rotary, nominal)
    positions; it knows that model by the run's summary.json beside it."""
    from sortedrl.commands.prepare import embedded_run_model

    for run, path, want in (("tiny", None, True), ("yours", "/m", False)):
        (tmp_path / run / "model").mkdir(parents=True)
        doc = {"config": {"model": {"path": path}}}
        (tmp_path / run / "summary.json").write_text(json.dumps(doc))
        assert embedded_run_model(tmp_path / run / "model") is want
    assert not embedded_run_model(tmp_path / "elsewhere" / "model")
