"""A run at real size on local Ray: 2 rollout replicas + 2 FSDP2 trainer ranks, a few updates,
on a Qwen2-architecture model built here with random weights and Qwen2's real vocabulary
(151,936), at two sizes. Memory and speed need no trained weights.

For each size it runs `sortedrl train` (reverse task, the model directory with the task's
character tokenizer, `cluster.backend=ray`) in a child process and prints

* the peak resident memory (VmHWM) of the driver, of each trainer rank and of each replica,
  read from /proc while the run goes (Ray's actor processes are found by their titles);
* the weight-sync seconds and bytes per update (`engine_stats.weight_sync_s`,
  `train/weight_bytes`: the object rank 0 puts into the object store once per update);
* the update seconds (`train/elapsed_s`: the trainer group's wall time);

and the peak per parameter of each kind of process. Sizes: `20m` (20.4M parameters) and
`50m` (44.8M), most of them the embedding, and `0.5b` (Qwen2.5-0.5B's shape, 494M; its memory,
computed from the smaller sizes' per-parameter figures in benchmarks/README.md, is more than a
machine shared by several jobs has free):

    python benchmarks/bench_real_size.py --sizes 20m,50m --updates 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: Qwen2 shapes; vocabulary 151,936 as Qwen2 / Qwen2.5 have it, embeddings tied.
SIZES = {
    "20m": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                num_attention_heads=2, num_key_value_heads=1),
    "50m": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=6,
                num_attention_heads=4, num_key_value_heads=2),
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2),
}  # fmt: skip
VOCAB = 151_936

#: Process titles of Ray's actors (`ray::Class.method` while a method runs, `ray::Class`
#: between calls).
KINDS = {"TrainerRank": "rank", "EngineReplica": "replica"}


def build_model(size: str, where: Path) -> tuple[Path, int]:
    """A random Qwen2 of `size` with the reverse task's tokenizer, saved under `where`."""
    import torch
    import transformers

    from sortedrl.models.tiny import build_char_tokenizer
    from sortedrl.tasks.registry import build_task

    path = where / f"qwen2-{size}"
    cfg = transformers.Qwen2Config(
        vocab_size=VOCAB,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        **SIZES[size],
    )
    if not (path / "config.json").is_file():
        torch.manual_seed(0)
        model = transformers.Qwen2ForCausalLM(cfg)
        model.save_pretrained(path, safe_serialization=True)
        from sortedrl.tasks.config import TaskConfig

        tok = build_char_tokenizer(build_task(TaskConfig()).alphabet)
        tok.save_pretrained(path)
        del model
    with torch.device("meta"):
        n = sum(p.numel() for p in transformers.Qwen2ForCausalLM(cfg).parameters())
    return path, n


def _processes(root: int) -> dict[int, str]:
    """pid -> the kind of Ray actor it is (rank, replica), among the descendants of `root`
    (the run's own Ray: its raylet starts the actors), not another run's on the machine."""
    import psutil

    found = {}
    try:
        children = psutil.Process(root).children(recursive=True)
    except psutil.NoSuchProcess:
        return found
    for p in children:
        try:
            title = " ".join(p.cmdline())
        except psutil.Error:
            continue
        for cls, kind in KINDS.items():
            if title.startswith(f"ray::{cls}"):
                found[p.pid] = kind
    return found


def _hwm_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def run_size(size: str, path: Path, args: argparse.Namespace, out: Path) -> dict:
    cmd = [
        sys.executable, "-m", "sortedrl.cli", "train", "--out", str(out), "--overwrite",
        f"model.path={path}", "cluster.backend=ray", "cluster.rollout_replicas=2",
        "cluster.trainer_ranks=2", f"max_updates={args.updates}",
        "scheduler.policy=sync", f"scheduler.group_size={args.group_size}",
        f"scheduler.update_batch={args.groups}",
        f"scheduler.max_new_tokens={args.max_new_tokens}", f"rollout.capacity={args.capacity}",
        "task.eval_prompts=4", "eval.sampled=0", "eval.every_updates=0",
        "checkpoint.every_updates=0", "trainer.mini_batches=1",
        f"trainer.max_tokens_per_micro_batch={args.micro_tokens}",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    child = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    peaks: dict[int, tuple[str, float]] = {}
    driver_peak = 0.0
    while child.poll() is None:
        driver_peak = max(driver_peak, _hwm_mib(child.pid) or 0.0)
        for pid, kind in _processes(child.pid).items():
            hwm = _hwm_mib(pid)
            if hwm is not None:
                peaks[pid] = (kind, max(hwm, peaks.get(pid, (kind, 0.0))[1]))
        time.sleep(0.5)
    log = child.stdout.read().decode(errors="replace") if child.stdout else ""
    if child.returncode != 0:
        raise SystemExit(f"{size}: sortedrl train failed ({child.returncode}):\n{log[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {
        "wall_s": time.perf_counter() - t0,
        "driver_mib": driver_peak,
        "ranks_mib": sorted(v for k, v in peaks.values() if k == "rank"),
        "replicas_mib": sorted(v for k, v in peaks.values() if k == "replica"),
        "update_s": [x["train/elapsed_s"] for x in lines],
        "weight_bytes": [x.get("train/weight_bytes", float("nan")) for x in lines],
        "weight_sync_s": summary["engine_stats"]["weight_sync_s"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="20m,50m", help="comma-separated: 20m, 50m, 0.5b")
    ap.add_argument("--updates", type=int, default=2)
    ap.add_argument("--groups", type=int, default=4, help="prompts per update")
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--capacity", type=int, default=8, help="per replica")
    ap.add_argument("--micro-tokens", type=int, default=512)
    ap.add_argument("--models", default=None, help="where the models are built (default: tmp)")
    args = ap.parse_args()
    where = Path(args.models or tempfile.mkdtemp(prefix="sortedrl-real-size-"))
    print(f"load average {os.getloadavg()}; models in {where}")
    rows = []
    for size in args.sizes.split(","):
        path, n = build_model(size, where)
        print(f"\n{size}: {n / 1e6:.1f}M parameters ({n * 4 / 2**20:.0f} MiB in fp32)")
        r = run_size(size, path, args, where / f"run-{size}")
        r["params"] = n
        rows.append((size, r))
        per = {
            "driver": r["driver_mib"],
            "rank": max(r["ranks_mib"], default=0.0),
            "replica": max(r["replicas_mib"], default=0.0),
        }
        print(f"  driver peak      {r['driver_mib']:8.0f} MiB")
        print(f"  ranks peak       {', '.join(f'{x:.0f}' for x in r['ranks_mib'])} MiB")
        print(f"  replicas peak    {', '.join(f'{x:.0f}' for x in r['replicas_mib'])} MiB")
        print(f"  update s         {', '.join(f'{x:.2f}' for x in r['update_s'])}")
        print(f"  weight sync s    {', '.join(f'{x:.2f}' for x in r['weight_sync_s'])}")
        mib = [f"{x / 2**20:.0f}" for x in r["weight_bytes"]]
        print(f"  weight MiB/upd.  {', '.join(mib)} (put once; each replica reads it once)")
        print(f"  peak bytes/param {', '.join(f'{k} {v * 2**20 / n:.1f}' for k, v in per.items())}")
        print(f"  wall s           {r['wall_s']:.0f}; load average {os.getloadavg()}")
    print("\njson:", json.dumps(rows))


if __name__ == "__main__":
    main()
