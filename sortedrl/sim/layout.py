"""Cluster layouts for `sortedrl simulate`: where rollout and training run, in GPUs.

The settings are `sortedrl train`'s `cluster` settings (`ClusterConfig`) that mean something to
a simulated run, under the same names, plus the GPU count (a real run has the GPUs its Ray
cluster has; a simulated one needs to be told). What each layout means here:

- `colocated`: `rollout_replicas` replicas of `tensor_parallel_size` GPUs each serve rollout,
  and the same GPUs train (`trainer_ranks` is that GPU count: one rank per GPU). Rollout and
  training take turns; the engine is paused for an update and its partial responses are
  re-prefilled after it. Every GPU of the study is used: replicas x tp must equal the GPUs.
- `separate`: rollout gets replicas x tp GPUs, training `trainer_ranks` GPUs of its own (one
  rank per GPU); the sum must fit the GPUs (GPUs left over stay idle). `async` overlaps the
  two sides. `sync`, `sorted` and `partial` still take turns, but on their own devices: the
  engine is not paused (its responses keep their KV cache across the update, and those past
  the staleness limit are aborted), the rollout GPUs stand idle while the trainer updates and
  the training GPUs while the engine generates. With no split given, every split in whole
  replicas is simulated and the one with the best goodput is reported.
- No layout given: `separate` for `async`, `colocated` for the others (as in
  `ClusterConfig.resolved_layout`).

Not modelled: a separate trainer still pays the preset's `update_overhead_s` (sized for a
colocated switch), and rollout GPUs get the preset's `gpu_memory_utilization` in either layout.
Pure Python: no torch, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from sortedrl.cluster.config import ClusterConfig, Layout
from sortedrl.engines.costmodel import ClusterSpec, CostModel, CostModelError
from sortedrl.errors import ConfigError

#: The `ClusterConfig` fields `sortedrl simulate` reads (its options use the same names).
CLUSTER_FIELDS = ("rollout_replicas", "trainer_ranks", "tensor_parallel_size", "layout")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def description(name: str) -> str:
    """The help of a cluster option: the `ClusterConfig` field's description."""
    return ClusterConfig.model_fields[name].description or ""


@dataclass(frozen=True)
class LayoutSettings:
    """The cluster settings of a study as given; None: not given (see the module docstring
    for what each defaults to)."""

    gpus: int | None = None
    rollout_replicas: int | None = None
    trainer_ranks: int | None = None
    tensor_parallel_size: int | None = None
    layout: Layout | None = None

    def given(self) -> dict[str, int | str]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass(frozen=True)
class Split:
    """One policy's resolved layout: how many replicas and training GPUs, of how many."""

    layout: Layout
    gpus: int
    tensor_parallel_size: int
    rollout_replicas: int
    trainer_ranks: int

    @property
    def rollout_gpus(self) -> int:
        return self.rollout_replicas * self.tensor_parallel_size

    def as_dict(self) -> dict[str, int | str]:
        return {
            "layout": self.layout,
            "gpus": self.gpus,
            "tensor_parallel_size": self.tensor_parallel_size,
            "rollout_replicas": self.rollout_replicas,
            "trainer_ranks": self.trainer_ranks,
            "rollout_gpus": self.rollout_gpus,
            "train_gpus": self.trainer_ranks,
        }


def cluster_spec(c: LayoutSettings, preset: ClusterSpec) -> ClusterSpec:
    """The preset on the study's GPU count and tensor-parallel size, checked to fit."""
    gpus = preset.gpus if c.gpus is None else c.gpus
    tp = preset.tp if c.tensor_parallel_size is None else c.tensor_parallel_size
    for name, value in (("gpus", gpus), ("tensor_parallel_size", tp)):
        if value < 1:
            raise ConfigError(f"{flag(name)} must be >= 1, got {value}")
    for name in ("rollout_replicas", "trainer_ranks"):
        value = getattr(c, name)
        if value is not None and value < 1:
            raise ConfigError(f"{flag(name)} must be >= 1, got {value}")
    if tp > gpus:
        raise ConfigError(
            f"--tensor-parallel-size {tp} exceeds --gpus {gpus}: one replica needs {tp} GPUs"
        )
    spec = replace(preset, gpus=gpus, tp=tp)
    try:
        CostModel(spec)
    except CostModelError as e:
        raise ConfigError(f"--tensor-parallel-size {tp}: {e}") from None
    return spec


def splits(c: LayoutSettings, spec: ClusterSpec, policy: str) -> list[Split]:
    """The layouts to simulate `policy` on: one, or every whole-replica split when the
    separate layout is chosen without a split. `spec` is `cluster_spec`'s."""
    layout: Layout = c.layout or ("separate" if policy == "async" else "colocated")
    if layout == "colocated":
        return [_colocated(c, spec, policy)]
    return _separate(c, spec)


def _colocated(c: LayoutSettings, spec: ClusterSpec, policy: str) -> Split:
    gpus, tp = spec.gpus, spec.tp
    how = "--layout colocated" if c.layout else f"colocated (the default layout for {policy})"
    if policy == "async":
        raise ConfigError(
            "--layout colocated: async trains beside rollout, so it needs the separate layout; "
            "leave async out of --policies or give --layout separate"
        )
    replicas = c.rollout_replicas if c.rollout_replicas is not None else gpus // tp
    used = replicas * tp
    if c.rollout_replicas is not None and used != gpus:
        of = "" if c.gpus is not None else f" (preset '{spec.name}')"
        raise ConfigError(
            f"{how}: --rollout-replicas {replicas} x --tensor-parallel-size {tp} = {used} GPUs, "
            f"but --gpus is {gpus}{of}; every GPU serves rollout and trains, so they must be "
            "equal"
        )
    if c.rollout_replicas is None and gpus % tp:
        raise ConfigError(
            f"{how}: --gpus {gpus} is not a multiple of --tensor-parallel-size {tp}; every GPU "
            "serves rollout and trains, in whole replicas"
        )
    if c.trainer_ranks is not None and c.trainer_ranks != used:
        raise ConfigError(
            f"{how}: --trainer-ranks {c.trainer_ranks}, but the trainer runs on the {used} "
            f"rollout GPUs (one rank each); leave it out, or give --layout separate for "
            "training GPUs of its own"
        )
    return Split("colocated", used, tp, replicas, used)


def _separate(c: LayoutSettings, spec: ClusterSpec) -> list[Split]:
    gpus, tp = spec.gpus, spec.tp
    r, m = c.rollout_replicas, c.trainer_ranks
    if gpus < tp + 1:
        raise ConfigError(
            f"separate layout: --gpus {gpus} leaves no GPU to train beside one replica of "
            f"--tensor-parallel-size {tp}"
        )
    if r is None and m is None:
        return [
            Split("separate", gpus, tp, k, gpus - k * tp)
            for k in range(1, gpus // tp + 1)
            if gpus - k * tp >= 1
        ]
    if r is None:
        assert m is not None
        r = (gpus - m) // tp
    elif m is None:
        m = gpus - r * tp
    if r < 1 or m < 1 or r * tp + m > gpus:
        raise ConfigError(
            f"separate layout: --rollout-replicas {r} x --tensor-parallel-size {tp} + "
            f"--trainer-ranks {m} GPUs must fit --gpus {gpus} with at least one replica and "
            "one training GPU"
        )
    return [Split("separate", gpus, tp, r, m)]
