"""A run says where it is: a resume names its checkpoint and step and its progress bar starts
there, with running means; your reward module in the current directory is found; TRL's setting
names point to ours; `eval` takes a run directory or a checkpoint and names its own flags."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from sortedrl.config import load_config  # noqa: E402
from sortedrl.errors import ConfigError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# The tiny run with checkpoints every 2 updates and no evaluation between.
MORE = ["scheduler.max_new_tokens=8", "checkpoint.every_updates=2", "eval.every_updates=0"]
pytestmark = pytest.mark.usefixtures("cache")


@pytest.fixture()
def tiny(tiny_run):
    return [*tiny_run, *MORE]


# --- TRL's names -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "ours"),
    [
        ("num_generations=8", "scheduler.group_size"),
        ("learning_rate=1e-6", "trainer.lr"),
        ("trainer.learning_rate=1e-6", "trainer.lr"),
        ("beta=0.04", "trainer.kl_coef"),
        ("max_steps=10", "max_updates"),
        ("scheduler.max_completion_length=64", "scheduler.max_new_tokens"),
    ],
)
def test_trls_setting_names_point_to_ours(given, ours):
    name = given.split("=")[0].split(".")[-1]
    with pytest.raises(ConfigError, match=rf"{name} is TRL's name; sortedrl's setting is {ours}"):
        load_config(None, [given])


def test_the_docs_table_of_trl_names_is_the_one_the_errors_use():
    from sortedrl.trl_names import TRL_NAMES

    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    rows = [
        line
        for page in pages
        if page.is_file()
        for line in page.read_text(encoding="utf-8").splitlines()
        if line.startswith("| `")
    ]
    for trl, (ours, _) in TRL_NAMES.items():
        setting = ours.split("=")[0]
        assert any(
            re.search(rf"`{trl}`", row.split("|")[1]) and f"`{setting}" in row for row in rows
        ), f"no docs row maps `{trl}` to `{ours}`"


# --- your reward module in the current directory -----------------------------------------


def test_a_reward_module_in_the_current_directory_is_found(tmp_path, monkeypatch):
    from sortedrl.tasks.user_rewards import load_reward_fn

    (tmp_path / "cwd_rewards_mod.py").write_text("def fn(problem, response):\n    return 1.0\n")
    monkeypatch.chdir(tmp_path)
    # As the `sortedrl` script runs: the current directory is not on sys.path by itself.
    here = {"", ".", str(tmp_path)}
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in here])
    sys.modules.pop("cwd_rewards_mod", None)
    assert load_reward_fn("cwd_rewards_mod:fn")(None, "x") == 1.0
    with pytest.raises(ConfigError, match=r"module 'not_here_mod' not found .*PYTHONPATH"):
        load_reward_fn("not_here_mod:fn")


# --- resume: the checkpoint and step, the progress bar ------------------------------------


def test_a_resume_names_its_checkpoint_and_the_bar_starts_there(tmp_path, capsys, tiny):
    from sortedrl.commands.train import train

    out = tmp_path / "run"
    train(load_config(None, [*tiny, "max_updates=2"]), out, progress=False)
    capsys.readouterr()
    train(load_config(None, [*tiny, "max_updates=4", "resume=auto"]), out, progress=False)
    said = capsys.readouterr().out
    assert f"resuming from {out / 'checkpoints' / 'step-00000002'} at update 2" in said


def _logger(tmp_path, tiny, **kw):
    from sortedrl.commands.logger import RunLogger

    cfg = load_config(None, tiny)
    return RunLogger(cfg, tmp_path, trace_lines=0, progress=True, **kw)


def _line(step, reward, acc):
    return {"step": step, "reward_mean": reward, "accuracy": acc, "response_len_mean": 4.0}


def test_the_progress_bar_starts_at_the_checkpoint_and_shows_running_means(tmp_path, tiny):
    logger = _logger(tmp_path, tiny, metrics_lines=4, resumed=True, total_updates=8)
    try:
        (task,) = logger.bar.tasks
        assert (task.completed, task.total) == (4, 8)
        logger.update(_line(5, 1.0, 1.0), [])
        logger.update(_line(6, 0.0, 0.0), [])
        (task,) = logger.bar.tasks
        assert task.completed == 6
        # The last update alone would say 0.000 and 0.00; the running means say otherwise.
        assert "reward 0.500" in task.fields["info"] and "acc 0.50" in task.fields["info"]
    finally:
        logger.finish()


# --- eval: a run directory or a checkpoint; its own flags ---------------------------------


def test_eval_takes_a_run_directory_or_a_checkpoint(tmp_path, tiny):
    from click.testing import CliRunner

    from sortedrl.cli import main
    from sortedrl.commands.train import train

    out = tmp_path / "run"
    train(load_config(None, [*tiny, "max_updates=2"]), out, progress=False)
    common = ["--prompts", "4", "--max-new-tokens", "8", "--capacity", "8"]
    by_dir = CliRunner().invoke(main, ["eval", "--model", str(out), *common])
    assert by_dir.exit_code == 0, by_dir.output
    ckpt = out / "checkpoints" / "step-00000002"
    by_ckpt = CliRunner().invoke(main, ["eval", "--model", str(ckpt), *common])
    assert by_ckpt.exit_code == 0, by_ckpt.output
    # The final model is the checkpoint's weights: the same scores.
    said_dir, said_ckpt = (r.output.replace("\n", "") for r in (by_dir, by_ckpt))  # unwrapped
    score = re.compile(r"pass@1 [0-9.]+.*mean reward [0-9.-]+")
    assert score.search(said_dir).group(0) == score.search(said_ckpt).group(0)
    assert f"{ckpt} (update 2)" in said_ckpt
    res = CliRunner().invoke(main, ["eval", "--model", str(tmp_path), *common])
    assert res.exit_code == 2 and "not a model directory, a run directory or a checkpoint" in (
        res.output
    )


def test_eval_path_without_a_file_task_names_the_flag(tmp_path):
    from click.testing import CliRunner

    from sortedrl.cli import main

    f = tmp_path / "x.jsonl"
    f.write_text('{"problem": "1+1", "answer": "2"}\n')
    res = CliRunner().invoke(main, ["eval", "--model", str(tmp_path), "--path", str(f)])
    assert res.exit_code == 2
    assert "--path" in res.output and "--task dataset" in res.output, res.output
    assert "eval_path" not in res.output
