"""Checkpoints of a training run: written atomically, loaded without unpickling anything.

A checkpoint is a directory `step-00000040/` under the run's `checkpoints/`:

    model.safetensors   policy weights (not with trainer_dcp/, whose shards hold them)
    trainer.pt          optimizer, LR schedule, step counters and every RNG state: tensors and
                        plain containers only, loaded with `torch.load(weights_only=True)`
    controller.json     the controller and rollout buffer (cached partial responses included)
    run.json            the run's own position: metrics lines written, history, evaluations
    trainer_dcp/        with trainer ranks in Ray actors: the model, optimizer and schedule,
                        sharded (torch.distributed.checkpoint, each rank its own part); then
                        trainer.pt holds only the RNG states, and there is no
                        model.safetensors (the driver holds no weights to write)
    MANIFEST.json       written last: every file's size and SHA-256

It is written into a temporary directory, each file flushed to disk, then renamed into place,
so a crash or a full disk never leaves a half-written checkpoint under a real name. Loading
checks the manifest; a damaged checkpoint is reported and the previous complete one is used.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sortedrl.errors import SortedRLError

WEIGHTS = "model.safetensors"
FILES = ("trainer.pt", "controller.json", "run.json")  # in every checkpoint
SHARDED = "trainer_dcp"  # the folder a sharded trainer writes its part into
MANIFEST = "MANIFEST.json"
PREFIX = "step-"


class CheckpointError(SortedRLError):
    pass


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint, verified against its manifest and read (`load_checkpoint`)."""

    path: Path
    step: int | None
    weights: Path | None  # model.safetensors (safetensors.torch.load_model); None: trainer_dcp
    trainer_state: dict[str, Any]  # trainer.pt: "trainer" (the trainer's part or None), "rng"
    controller: dict[str, Any]  # controller.json
    run: dict[str, Any]  # run.json
    trainer_dcp: Path | None  # the trainer's sharded part, or None when trainer.pt holds it


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, doc: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(
    root: Path,
    step: int,
    *,
    model: Any | None,
    trainer_state: dict[str, Any],
    controller_state: dict[str, Any],
    run_state: dict[str, Any],
    keep: int,
    trainer_part: Callable[[Path], dict[str, Any] | None] | None = None,
) -> Path:
    """Write checkpoint `step` under `root`, then prune: of the checkpoints of steps up to
    `step`, the newest `keep` by step number stay (this one always among them); any of a later
    step is from a timeline this run has left (it resumed from an earlier one) and goes.

    On any error (a full disk, say: safetensors and torch raise their own error types) the
    temporary directory is removed, the previous checkpoints are untouched, and a
    `CheckpointError` names both this checkpoint and the previous one.

    `trainer_part(folder)`, when given, is the trainer's part (`CheckpointedTrainer.
    save_checkpoint`): what it returns goes into `trainer.pt` under "trainer"; a sharded trainer
    writes into `folder` (`trainer_dcp/`, every rank its part) instead, and those files are in
    the manifest like the others. `model` None: the weights are in the trainer's sharded
    part alone, and no `model.safetensors` is written; a trainer that writes no folder then
    is an error (the checkpoint would hold no weights)."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".tmp-{PREFIX}{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_files(tmp, step, model, trainer_state, controller_state, run_state, trainer_part)
        if final.exists():  # a rerun of the same step (after a resume): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(root)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = [p for p in complete_checkpoints(root) if p != final]
        kept = (
            f"; the previous checkpoint {previous[-1]} is intact"
            if previous
            else "; there is no earlier checkpoint"
        )
        raise CheckpointError(
            f"could not write checkpoint {final}: {type(e).__name__}: {e}{kept}"
        ) from e
    except BaseException:  # interrupted: leave no partial directory behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    done = complete_checkpoints(root)
    later = [p for p in done if checkpoint_step(p) > step]
    earlier = [p for p in done if checkpoint_step(p) < step]
    for old in later + earlier[: max(0, len(earlier) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _write_files(
    tmp: Path,
    step: int,
    model: Any,
    trainer_state: dict[str, Any],
    controller_state: dict[str, Any],
    run_state: dict[str, Any],
    trainer_part: Callable[[Path], dict[str, Any] | None] | None,
) -> None:
    import torch
    from safetensors.torch import save_model

    tmp.mkdir()
    if model is not None:
        save_model(model, str(tmp / WEIGHTS))
    # Fault-injection tests widen the window in which a kill lands mid-write.
    pause = float(os.environ.get("SORTEDRL_TEST_CHECKPOINT_PAUSE_S", "0") or 0)
    if pause > 0:
        time.sleep(pause)
    if trainer_part is not None:
        trainer_state = {**trainer_state, "trainer": trainer_part(tmp / SHARDED)}
    torch.save(trainer_state, tmp / "trainer.pt")
    _write_json(tmp / "controller.json", controller_state)
    _write_json(tmp / "run.json", run_state)
    names = list(FILES) if model is None else [WEIGHTS, *FILES]
    if model is None and not (tmp / SHARDED).is_dir():
        raise ValueError(f"no weights: no model given and the trainer wrote no {SHARDED}/")
    if (tmp / SHARDED).is_dir():
        names += sorted(str(p.relative_to(tmp)) for p in (tmp / SHARDED).rglob("*") if p.is_file())
    for name in names:
        _fsync(tmp / name)
    manifest = {
        "step": step,
        "files": {
            n: {"bytes": (tmp / n).stat().st_size, "sha256": _sha256(tmp / n)} for n in names
        },
    }
    _write_json(tmp / MANIFEST, manifest)


def checkpoint_step(path: Path) -> int:
    """The step number in a checkpoint directory's name (`step-00000040` -> 40)."""
    try:
        return int(path.name[len(PREFIX) :])
    except ValueError:
        return -1


def complete_checkpoints(root: Path) -> list[Path]:
    """Checkpoint directories with a manifest, by step number, oldest first (not verified)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / MANIFEST).is_file()]
    return sorted(found, key=lambda p: (checkpoint_step(p), p.name))


def load_checkpoint(path: Path) -> Checkpoint:
    """Verify and read one checkpoint; a damaged one raises `CheckpointError` naming the file."""
    import torch

    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise CheckpointError(f"{path}: not a complete checkpoint (no {MANIFEST})")
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path / MANIFEST}: unreadable manifest ({e})") from None
    if not isinstance(files, dict):
        raise CheckpointError(f"{path / MANIFEST}: unreadable manifest (no file list)")
    sharded = any(isinstance(n, str) and n.startswith(SHARDED + "/") for n in files)
    required = set(FILES) if sharded else {WEIGHTS, *FILES}
    for name in sorted(required | set(files)):
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise CheckpointError(f"{path / MANIFEST}: file name {name!r} leaves the checkpoint")
        f = path / name
        want = files.get(name)
        if not f.is_file() or want is None:
            raise CheckpointError(f"{f}: missing")
        if f.stat().st_size != want.get("bytes") or _sha256(f) != want.get("sha256"):
            raise CheckpointError(f"{f}: damaged (size or checksum differs from the manifest)")
    try:
        from safetensors import safe_open

        if WEIGHTS in files:
            with safe_open(str(path / WEIGHTS), framework="pt") as f:
                if not list(f.keys()):
                    raise ValueError("no tensors")
        trainer_state = torch.load(path / "trainer.pt", weights_only=True)
        controller_state = json.loads((path / "controller.json").read_text(encoding="utf-8"))
        run_state = json.loads((path / "run.json").read_text(encoding="utf-8"))
    except Exception as e:  # anything unreadable is a damaged checkpoint, never a crash
        raise CheckpointError(f"{path}: cannot be read ({type(e).__name__}: {e})") from None
    return Checkpoint(
        path=path,
        step=manifest.get("step"),
        weights=path / WEIGHTS if WEIGHTS in files else None,
        trainer_state=trainer_state,
        controller=controller_state,
        run=run_state,
        trainer_dcp=path / SHARDED if sharded else None,
    )


def latest_checkpoint(root: Path) -> tuple[Checkpoint | None, list[str]]:
    """The newest checkpoint that loads, and a warning for each newer one that did not."""
    warnings: list[str] = []
    for path in reversed(complete_checkpoints(root)):
        try:
            return load_checkpoint(path), warnings
        except CheckpointError as e:
            warnings.append(f"skipping damaged checkpoint: {e}")
    return None, warnings
