"""`sortedrl train rollout.engine=vllm`: a few updates on the vLLM engine, then resumed from the
checkpoint; the controller's counts balance as with every engine."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("vllm")
pytest.importorskip("torch")

from sortedrl.config import load_config  # noqa: E402

pytestmark = pytest.mark.usefixtures("cache")


@pytest.fixture
def tiny(tiny_run):
    """The tiny run on vLLM, with longer responses and the default sampled evaluation."""
    return [
        "rollout.engine=vllm",
        *tiny_run,
        "task.eval_prompts=8",
        "model.warm_start_steps=5",
        "scheduler.max_new_tokens=32",
        "eval.sampled=4",
    ]


def test_train_on_vllm_then_resume_from_its_checkpoint(tiny, tmp_path):
    from sortedrl.commands.train import train

    out = tmp_path / "run"
    first = train(load_config(None, [*tiny, "max_updates=2"]), out, progress=False)
    assert first["updates"] == 2
    s = train(load_config(None, [*tiny, "resume=auto"]), out, progress=False)
    assert s["resumed_from"]
    assert "weight_loads" in first["engine_stats"]  # the vLLM engine ran, not another
    assert s["prompts_trained"] + s["prompts_dropped"] == s["prompts_admitted"] == 16
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == list(range(1, len(lines) + 1))
    assert len(lines) == s["updates"] > 2


def test_eval_on_vllm_scores_like_the_transformers_engine(tiny, tmp_path):
    from click.testing import CliRunner

    from sortedrl.cli import main
    from sortedrl.commands.prepare import prepare_model
    from sortedrl.tasks.registry import build_task

    cfg = load_config(None, tiny)
    model, tokenizer = prepare_model(cfg, build_task(cfg.task))  # the warm-started model
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    scores = {}
    for engine in ("transformers", "vllm"):
        out = tmp_path / f"{engine}.json"
        args = ["eval", "--model", str(tmp_path / "model"), "--prompts", "8"]
        result = CliRunner().invoke(main, [*args, "--engine", engine, "--json", str(out)])
        assert result.exit_code == 0, result.output
        scores[engine] = json.loads(out.read_text())
    # Greedy on both: the same responses but for a near-tie flipped by other fp32 kernels
    # (at most one of the 8 problems).
    assert abs(scores["vllm"]["pass@1"] - scores["transformers"]["pass@1"]) <= 1 / 8
    assert scores["vllm"]["response_len_mean"] > 0
