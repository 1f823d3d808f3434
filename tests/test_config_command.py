"""`sortedrl config` lists every setting with its default and description, and `sortedrl train
--help` names the engines and tasks of the registries and points at it."""

from __future__ import annotations

import yaml
from click.testing import CliRunner
from pydantic import BaseModel

from sortedrl.cli import main
from sortedrl.config import TrainConfig, load_config
from sortedrl.engines.registry import ENGINES
from sortedrl.tasks.registry import TASKS


def _fields(model: BaseModel, prefix: str = ""):
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            yield from _fields(value, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", field


def _lookup(doc: dict, dotted: str):
    node = doc
    for part in dotted.split("."):
        assert isinstance(node, dict) and part in node, f"{dotted} missing from sortedrl config"
        node = node[part]
    return node


def test_config_prints_every_setting_and_loads_back_as_the_defaults(tmp_path):
    res = CliRunner().invoke(main, ["config"])
    assert res.exit_code == 0, res.output
    doc = yaml.safe_load(res.output)
    defaults = TrainConfig().model_dump(mode="json")
    for dotted, _ in _fields(TrainConfig()):
        assert _lookup(doc, dotted) == _lookup(defaults, dotted), dotted
    path = tmp_path / "all.yaml"
    path.write_text(res.output)
    assert load_config(str(path), []) == TrainConfig()


def _comments_by_key(text: str) -> dict[str, str]:
    """Each dotted key of the printed YAML and the comment lines just above it."""
    out: dict[str, str] = {}
    path: list[str] = []
    comment: list[str] = []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped:
            comment = []
            continue
        if stripped.startswith("# "):
            comment.append(stripped[2:])
            continue
        depth = (len(line) - len(line.lstrip())) // 2
        key = stripped.split(":", 1)[0]
        path = [*path[:depth], key]
        out[".".join(path)] = " ".join(comment)
        comment = []
    return out


def test_every_setting_has_a_description_and_config_prints_it():
    printed = _comments_by_key(CliRunner().invoke(main, ["config"]).output)
    undocumented = [d for d, f in _fields(TrainConfig()) if not f.description]
    assert not undocumented, f"settings without a description: {undocumented}"
    for dotted, field in _fields(TrainConfig()):
        assert " ".join(field.description.split()) == printed[dotted], dotted


def test_train_help_names_every_engine_and_task_and_points_at_config():
    out = CliRunner().invoke(main, ["train", "--help"]).output
    for name in [*ENGINES, *TASKS]:
        assert name in out, name
    assert "transformers (default)" in out and "reverse (default)" in out
    assert "sortedrl config" in out
