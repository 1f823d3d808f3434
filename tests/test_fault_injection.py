"""Kill training with SIGKILL at random points, resume each time, and check that the run ends
exactly as an uninterrupted one: the same metrics (time fields aside), every prompt trained
once, none lost.

Kill points: during rollout or an update (after a random number of updates), and while a
checkpoint is being written (the checkpoint writer is slowed down so the kill lands inside it).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

ARGS = [
    "task.train_prompts=24",
    "task.eval_prompts=8",
    "model.warm_start_steps=5",
    "model.warm_start_batch=8",
    "scheduler.group_size=2",
    "rollout.capacity=8",
    "scheduler.update_batch=2",
    "scheduler.rollout_batch=4",
    "scheduler.max_new_tokens=24",
    "checkpoint.every_updates=1",
    "checkpoint.keep=2",
    "eval.sampled=0",
]
TIMELESS = ("time", "elapsed", "bubble")  # wall-clock measurements differ from run to run


def _cmd(out: Path, resume: bool) -> list[str]:
    cmd = [sys.executable, "-m", "sortedrl.cli", "train", "--out", str(out), "--no-progress"]
    return cmd + (["--resume", "auto"] if resume else []) + ARGS


def _metrics(path: Path) -> list[dict]:
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if not any(t in k for t in TIMELESS)} for r in rows]


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.is_file() else 0


def test_sigkill_anywhere_then_resume_matches_an_uninterrupted_run(tmp_path, cache):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the cache fixture set SORTEDRL_CACHE
    ref = tmp_path / "ref"
    subprocess.run(_cmd(ref, False), env=env, check=True, capture_output=True, timeout=600)

    out = tmp_path / "killed"
    rng = random.Random(7)
    kills: list[str] = []
    env_slow = {**env, "SORTEDRL_TEST_CHECKPOINT_PAUSE_S": "0.4"}
    for attempt in range(12):
        mode = ["rollout", "checkpoint"][attempt % 2] if attempt < 8 else "none"
        proc = subprocess.Popen(
            _cmd(out, resume=attempt > 0),
            env=env_slow if mode == "checkpoint" else env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        target = _lines(out / "metrics.jsonl") + rng.randint(1, 3)
        deadline = time.monotonic() + 300
        while proc.poll() is None and mode != "none" and time.monotonic() < deadline:
            ckpts = out / "checkpoints"
            writing = ckpts.is_dir() and any(p.name.startswith(".tmp-") for p in ckpts.iterdir())
            if (
                mode == "checkpoint" and writing and _lines(out / "metrics.jsonl") >= target - 1
            ) or (mode == "rollout" and _lines(out / "metrics.jsonl") >= target):
                if mode == "rollout":
                    time.sleep(rng.uniform(0.0, 0.3))  # land inside rollout or the update
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                kills.append(f"{mode}@{_lines(out / 'metrics.jsonl')}")
                break
            time.sleep(0.02)
        if proc.poll() is None:
            proc.wait(timeout=600)
        if proc.returncode == 0:
            break
        assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert proc.returncode == 0
    assert len(kills) >= 4, kills
    assert any(k.startswith("checkpoint") for k in kills), kills

    # Same metrics as the uninterrupted run, line for line.
    assert _metrics(out / "metrics.jsonl") == _metrics(ref / "metrics.jsonl")
    # Exactly once: every prompt trained once, none lost, counts balanced.
    trace = [json.loads(x)["prompt_id"] for x in (out / "trace.jsonl").read_text().splitlines()]
    assert len(trace) == len(set(trace)) == 24
    s = json.loads((out / "summary.json").read_text())
    r = json.loads((ref / "summary.json").read_text())
    assert s["prompts_admitted"] == s["prompts_trained"] + s["prompts_dropped"] == 24
    assert s["tokens_generated"] == s["tokens_trained"] + s["tokens_wasted"]
    for key in ("tokens_generated", "tokens_trained", "tokens_wasted", "eval_after"):
        assert s[key] == r[key], key
    print(f"\n[fault injection] {len(kills)} SIGKILLs at {kills}; resumed run matches")


def test_sigterm_checkpoints_and_resume_finishes_exactly_once(tmp_path, cache):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the cache fixture set SORTEDRL_CACHE
    out = tmp_path / "run"
    proc = subprocess.Popen(
        _cmd(out, resume=False), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 300
    while _lines(out / "metrics.jsonl") < 3 and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM
    assert "stopped by SIGTERM" in err.decode() and "--resume auto" in err.decode()
    stopped_at = _lines(out / "metrics.jsonl")
    assert list((out / "checkpoints").glob("step-*"))

    subprocess.run(_cmd(out, resume=True), env=env, check=True, capture_output=True, timeout=600)
    trace = [json.loads(x)["prompt_id"] for x in (out / "trace.jsonl").read_text().splitlines()]
    assert len(trace) == len(set(trace)) == 24  # every prompt trained exactly once
    s = json.loads((out / "summary.json").read_text())
    assert s["prompts_admitted"] == s["prompts_trained"] == 24
    assert s["tokens_generated"] == s["tokens_trained"] + s["tokens_wasted"]
    assert _lines(out / "metrics.jsonl") == 12 > stopped_at


def test_default_checkpoint_interval_resume_replays_the_lost_updates(tmp_path, cache):
    """`checkpoint.every_updates` at its default (20): a kill after update 22 loses updates 21
    and 22; the resumed run replays them from step 20 and ends as the uninterrupted run."""
    args = [a for a in ARGS if not a.startswith(("checkpoint.", "task.train_prompts"))]
    args += ["task.train_prompts=44", "scheduler.max_new_tokens=12", "task.eval_prompts=4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the cache fixture set SORTEDRL_CACHE

    def cmd(out: Path, resume: bool) -> list[str]:
        base = [sys.executable, "-m", "sortedrl.cli", "train", "--out", str(out), "--no-progress"]
        return base + (["--resume", "auto"] if resume else []) + args

    ref = tmp_path / "ref"
    subprocess.run(cmd(ref, False), env=env, check=True, capture_output=True, timeout=900)
    assert _lines(ref / "metrics.jsonl") == 22

    out = tmp_path / "killed"
    # The final checkpoint is slowed down; the kill lands inside it, after all 22 updates.
    slow = {**env, "SORTEDRL_TEST_CHECKPOINT_PAUSE_S": "3"}
    proc = subprocess.Popen(cmd(out, False), env=slow, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 900
    while _lines(out / "metrics.jsonl") < 22 and time.monotonic() < deadline:
        assert proc.poll() is None
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert [p.name for p in (out / "checkpoints").glob("step-*")] == ["step-00000020"]

    subprocess.run(cmd(out, True), env=env, check=True, capture_output=True, timeout=900)
    assert _metrics(out / "metrics.jsonl") == _metrics(ref / "metrics.jsonl")
    trace = [json.loads(x)["prompt_id"] for x in (out / "trace.jsonl").read_text().splitlines()]
    assert len(trace) == len(set(trace)) == 44  # the replayed groups are not counted twice
    s = json.loads((out / "summary.json").read_text())
    r = json.loads((ref / "summary.json").read_text())
    assert s["resumed_from"].endswith("step-00000020")
    for key in ("tokens_generated", "tokens_trained", "tokens_wasted", "eval_after"):
        assert s[key] == r[key], key
