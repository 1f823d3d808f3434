"""`sortedrl train rollout.engine=vllm`: a few updates on the vLLM engine, then resumed from the
checkpoint; the controller's counts balance as with every engine."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("vllm")
pytest.importorskip("torch")

from sortedrl.config import load_config  # noqa: E402

TINY = [
    "rollout.engine=vllm",
    "task.train_prompts=16",
    "task.eval_prompts=8",
    "model.warm_start_steps=5",
    "model.warm_start_batch=8",
    "scheduler.group_size=2",
    "rollout.capacity=8",
    "scheduler.update_batch=2",
    "scheduler.rollout_batch=4",
    "scheduler.max_new_tokens=32",
]


def test_train_on_vllm_then_resume_from_its_checkpoint(tmp_path, monkeypatch):
    from sortedrl.commands.train import train

    monkeypatch.setenv("SORTEDRL_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    first = train(load_config(None, [*TINY, "max_updates=2"]), out, progress=False)
    assert first["updates"] == 2
    s = train(load_config(None, [*TINY, "resume=auto"]), out, progress=False)
    assert s["resumed_from"]
    assert "weight_loads" in first["engine_stats"]  # the vLLM engine ran, not another
    assert s["prompts_trained"] + s["prompts_dropped"] == s["prompts_admitted"] == 16
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == list(range(1, len(lines) + 1))
    assert len(lines) == s["updates"] > 2
