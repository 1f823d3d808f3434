"""Train settings: text stays text, no torch to read them, one name per setting, no option
accepted and ignored."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from click.testing import CliRunner

from sortedrl.config import load_config
from sortedrl.errors import ConfigError


def test_paths_on_the_command_line_stay_strings():
    cfg = load_config(None, ["model.path=2024", "resume=on", "task.path=1e3", "task.name=math"])
    assert cfg.model.path == "2024" and cfg.resume == "on" and cfg.task.path == "1e3"
    assert load_config(None, ["model.path=null"]).model.path is None
    # Numbers and flags are still parsed as such.
    cfg = load_config(None, ["seed=7", "rollout.pause_for_update=true", "trainer.lr=1e-5"])
    assert cfg.seed == 7 and cfg.rollout.pause_for_update is True and cfg.trainer.lr == 1e-5


def test_train_cli_model_and_resume_flags_stay_strings(tmp_path):
    from sortedrl.cli import main

    res = CliRunner().invoke(main, ["train", "--out", str(tmp_path / "o"), "--model", "2024"])
    assert res.exit_code == 2 and "model.path: 2024 is not a directory" in res.output
    res = CliRunner().invoke(main, ["train", "--out", str(tmp_path / "o"), "--resume", "on"])
    assert res.exit_code == 2 and "resume: on is not a run directory" in res.output


def test_loading_a_config_does_not_import_torch(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("rollout:\n  capacity: 4\nscheduler:\n  policy: sync\n  group_size: 4\n")
    code = textwrap.dedent(
        f"""
        import sys
        import sortedrl.config
        cfg = sortedrl.config.load_config({str(path)!r}, ["trainer.lr=1e-5"])
        assert cfg.trainer.lr == 1e-5
        heavy = [m for m in ("torch", "transformers", "numpy") if m in sys.modules]
        assert not heavy, heavy
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_one_temperature_and_one_seed():
    with pytest.raises(
        ConfigError, match="trainer.temperature: .*sortedrl's setting is rollout.temperature"
    ):
        load_config(None, ["trainer.temperature=0.7"])
    with pytest.raises(ConfigError, match="trainer.seed: Extra inputs"):
        load_config(None, ["trainer.seed=3"])


def test_an_engine_that_cannot_be_built_is_refused_by_name():
    with pytest.raises(ConfigError, match="rollout.engine: Input should be 'transformers' or"):
        load_config(None, ["rollout.engine=sglang"])


def test_the_vllm_engine_needs_vllm_installed(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a)
    )
    with pytest.raises(ConfigError, match="rollout.engine: 'vllm' needs vllm, not installed"):
        load_config(None, ["rollout.engine=vllm"])


def test_wandb_without_the_package_is_a_clear_error(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    from sortedrl.commands.logger import RunLogger

    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    cfg = load_config(None, ["logging.wandb=true"])
    with pytest.raises(ConfigError, match="logging.wandb: true needs the wandb package"):
        RunLogger(
            cfg,
            tmp_path,
            metrics_lines=0,
            trace_lines=0,
            resumed=False,
            total_updates=1,
            progress=False,
        )


def test_update_pacing_is_on_for_sorted_and_recorded_off_for_the_others():
    # Only sorted reads it; the others record it off, as their runs did before it became
    # sorted's default, so a run's settings (what a resume compares) stay as they were.
    assert load_config(None, []).scheduler.update_pacing is True
    assert load_config(None, ["scheduler.update_pacing=false"]).scheduler.update_pacing is False
    for policy in ("sync", "partial", "async"):
        cfg = load_config(None, [f"scheduler.policy={policy}"])
        assert cfg.scheduler.update_pacing is False
        assert cfg.model_dump(mode="json")["scheduler"]["update_pacing"] is False
    with pytest.raises(ConfigError, match="update_pacing is set, but policy sync ignores it"):
        load_config(None, ["scheduler.policy=sync", "scheduler.update_pacing=false"])


@pytest.mark.parametrize(
    "scheduler",
    [
        {"policy": "sync"},
        {"policy": "sorted"},
        {"policy": "sorted", "cache": "drop", "rollout_batch": 48},
        {"policy": "partial", "rollout_batch": 40},
        {"policy": "async"},
        {"policy": "async", "max_staleness": 1},
        {"policy": "sorted", "update_pacing": False, "submit_order": "longest_predicted"},
    ],
)
def test_the_settings_a_run_saved_load_back_as_the_same_config(scheduler):
    # run.json records every field of the config (model_dump); `sortedrl eval --checkpoint`
    # reads them back. A dump sets fields the policy ignores, which a config written by hand
    # may not set, so the saved scheduler section is read back through `from_saved`.
    from sortedrl.config import TrainConfig, saved_config

    cfg = TrainConfig.model_validate({"scheduler": scheduler})
    assert saved_config(cfg.model_dump(mode="json")) == cfg
