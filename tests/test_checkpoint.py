"""Checkpoints: atomic writes, verified loads, nothing unpickled, a full disk survived."""

from __future__ import annotations

import errno
import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from sortedrl.commands.checkpoint import (  # noqa: E402
    CheckpointError,
    complete_checkpoints,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))


def _save(root, step, keep=3, model=None):
    return save_checkpoint(
        root,
        step,
        model=model or _model(),
        trainer_state={"step": step, "rng": torch.get_rng_state(), "lists": [1, 2.5, None]},
        controller_state={"format": 1, "step": step},
        run_state={"history": [{"step": step}]},
        keep=keep,
    )


def test_round_trip_and_keep_the_newest(tmp_path):
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, keep=2)
    names = [p.name for p in complete_checkpoints(tmp_path)]
    assert names == ["step-00000003", "step-00000004"]
    ck = load_checkpoint(tmp_path / "step-00000004")
    assert ck.step == 4 and ck.trainer_state["step"] == 4
    assert ck.controller == {"format": 1, "step": 4}
    from safetensors.torch import load_model

    m = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    load_model(m, str(ck.weights))
    assert all(
        torch.equal(a, b) for a, b in zip(m.parameters(), _model().parameters(), strict=True)
    )
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete_manifest", "bad_manifest"])
def test_a_damaged_checkpoint_is_reported_and_the_previous_one_used(tmp_path, damage):
    _save(tmp_path, 1)
    newest = _save(tmp_path, 2)
    target = newest / "model.safetensors"
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:20])
    elif damage == "flip":
        data = bytearray(target.read_bytes())
        data[-1] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "delete_manifest":
        (newest / "MANIFEST.json").unlink()
    else:
        (newest / "MANIFEST.json").write_text("{not json")
    if damage != "delete_manifest":
        with pytest.raises(CheckpointError, match=str(newest.name)):
            load_checkpoint(newest)
    found, warnings = latest_checkpoint(tmp_path)
    assert found is not None and found.step == 1
    assert len(warnings) == (0 if damage == "delete_manifest" else 1)


def test_nothing_is_unpickled_from_a_checkpoint(tmp_path):
    import hashlib

    newest = _save(tmp_path, 1)

    class Evil:
        def __reduce__(self):
            return (print, ("unpickled!",))

    torch.save({"payload": Evil()}, newest / "trainer.pt")
    # Make the manifest agree, as an attacker would: the load must still refuse.
    manifest = json.loads((newest / "MANIFEST.json").read_text())
    data = (newest / "trainer.pt").read_bytes()
    manifest["files"]["trainer.pt"] = {
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    (newest / "MANIFEST.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(newest)


def test_a_full_disk_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    previous = _save(tmp_path, 1)
    before = {p.name: p.read_bytes() for p in previous.iterdir()}
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError, match="No space left on device.*step-00000001 is intact"):
        _save(tmp_path, 2)
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000001"]  # no partial directory
    assert {p.name: p.read_bytes() for p in previous.iterdir()} == before
    assert load_checkpoint(previous).step == 1


def test_a_new_checkpoint_is_never_pruned_by_older_higher_names(tmp_path):
    # Left from a run that got further (steps 720..750): the new step 20 must survive its own
    # pruning, and the abandoned later steps must not shadow it for --resume auto.
    for step in (720, 730, 740, 750):
        _save(tmp_path, step, keep=3)
    new = _save(tmp_path, 20, keep=3)
    assert new.is_dir()
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-00000020"]
    found, _ = latest_checkpoint(tmp_path)
    assert found is not None and found.step == 20


def test_pruning_keeps_the_newest_by_step_number(tmp_path):
    for step in (8, 9, 10, 11):
        _save(tmp_path, step, keep=2)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-00000010", "step-00000011"]


_FULL_DISK = """
import resource, signal, sys
from pathlib import Path
import torch
from sortedrl.commands.checkpoint import CheckpointError, save_checkpoint

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
root, limit = Path(sys.argv[1]), int(sys.argv[2])
torch.manual_seed(0)
model = torch.nn.Linear(256, 256)  # about 260 kB of safetensors
state = {"optimizer": torch.zeros(300_000)}  # about 1.2 MB with torch.save

def save(step):
    return save_checkpoint(root, step, model=model, trainer_state=state,
                           controller_state={}, run_state={}, keep=3)

save(1)
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
try:
    save(2)
except CheckpointError as e:
    print(e)
    sys.exit(3)
"""


@pytest.mark.parametrize(
    "limit, writer", [(100_000, "safetensors"), (600_000, "torch.save")], ids=lambda x: str(x)
)
def test_a_real_full_disk_is_caught_from_either_writer(tmp_path, limit, writer):
    """The real writers fail (a file-size limit, as a full disk would): safetensors' and
    torch's own error types are caught, nothing partial is left, the message names both."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = tmp_path / "ck"
    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": repo + os.pathsep + os.environ.get("PYTHONPATH", "")}
    res = subprocess.run(
        [sys.executable, "-c", _FULL_DISK, str(root), str(limit)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert res.returncode == 3, (writer, res.stdout, res.stderr[-2000:])
    assert "Traceback" not in res.stderr
    assert "could not write checkpoint" in res.stdout and "step-00000002" in res.stdout
    assert "step-00000001 is intact" in res.stdout
    assert sorted(p.name for p in root.iterdir()) == ["step-00000001"]  # no temporary dir
    assert load_checkpoint(root / "step-00000001").step == 1
    size = (root / "step-00000001" / "model.safetensors").stat().st_size
    assert (limit < size) == (writer == "safetensors")  # the intended writer failed


def _write_shards(folder):
    """What a sharded trainer writes: a file per rank and a metadata file."""
    folder.mkdir()
    for rank in (0, 1):
        (folder / f"__{rank}_0.distcp").write_bytes(bytes([rank]) * 100)
    (folder / ".metadata").write_bytes(b"meta")


def test_a_sharded_trainer_part_is_in_the_manifest_and_verified(tmp_path):
    root = tmp_path / "ck"
    ck = save_checkpoint(
        root,
        1,
        model=_model(),
        trainer_state={"trainer": None, "rng": torch.get_rng_state()},
        controller_state={"format": 3},
        run_state={},
        keep=2,
        trainer_part=_write_shards,
    )
    loaded = load_checkpoint(ck)
    assert loaded.trainer_dcp == ck / "trainer_dcp"
    files = json.loads((ck / "MANIFEST.json").read_text())["files"]
    assert {"trainer_dcp/__0_0.distcp", "trainer_dcp/__1_0.distcp", "trainer_dcp/.metadata"} <= set(
        files
    )
    assert load_checkpoint(_save(tmp_path / "plain", 1)).trainer_dcp is None
    (ck / "trainer_dcp" / "__1_0.distcp").write_bytes(b"\0" * 100)  # one rank's part damaged
    with pytest.raises(CheckpointError, match="__1_0.distcp: damaged"):
        load_checkpoint(ck)


def test_a_manifest_naming_a_file_outside_the_checkpoint_is_refused(tmp_path):
    ck = _save(tmp_path, 1)
    doc = json.loads((ck / "MANIFEST.json").read_text())
    doc["files"]["../../etc/passwd"] = {"bytes": 1, "sha256": "0"}
    (ck / "MANIFEST.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="leaves the checkpoint"):
        load_checkpoint(ck)


def test_a_sharded_trainer_part_alone_holds_the_weights_and_a_checkpoint_without_them_fails(
    tmp_path,
):
    def save(root, part):
        return save_checkpoint(
            root,
            1,
            model=None,  # the trainer ranks' shards hold the weights
            trainer_state={"trainer": None, "rng": torch.get_rng_state()},
            controller_state={"format": 3},
            run_state={},
            keep=2,
            trainer_part=part,
        )

    ck = save(tmp_path / "ck", _write_shards)
    assert not (ck / "model.safetensors").exists()
    loaded = load_checkpoint(ck)
    assert loaded.weights is None and loaded.trainer_dcp == ck / "trainer_dcp"
    (ck / "trainer_dcp" / ".metadata").unlink()  # the shards are verified like any file
    with pytest.raises(CheckpointError, match=r"trainer_dcp/\.metadata: missing"):
        load_checkpoint(ck)
    with pytest.raises(CheckpointError, match="no weights: no model given"):
        save(tmp_path / "none", lambda folder: None)
    assert complete_checkpoints(tmp_path / "none") == []
    # a checkpoint of the local backend still needs its model.safetensors
    plain = _save(tmp_path / "plain", 1)
    (plain / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors: missing"):
        load_checkpoint(plain)
