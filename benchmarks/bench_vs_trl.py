"""sortedrl against TRL's GRPOTrainer: the same model, data, reward and budget, on the CPU.

One command builds everything itself (nothing is downloaded): a task of reversing letter
strings of long-tailed lengths (JSON Lines, fields ``prompt`` and ``answer``), the embedded
tiny Llama with a character tokenizer, warm-started by a short supervised phase and saved as a
Hugging Face directory, and a TRL-style reward function (:func:`reverse_reward`). Then it trains
three times from that directory with the same group size, prompts per update, learning rate,
temperature, response cap, optimizer and loss (DAPO token mean, clip 0.2 / 0.28, no KL) and
the same number of trained samples:

* TRL ``GRPOTrainer`` with its default generation path (``model.generate``), on the CPU;
* ``sortedrl train`` (the CLI, in a subprocess) under ``scheduler.policy=sync``;
* ``sortedrl train`` under the default policy (``sorted``).

Each run is a separate process. It prints samples trained per second and generated tokens per
second of the training loop (evaluation and set-up excluded), wall time per update, and
held-out greedy accuracy before and after, all measured by this script on the saved models with
one evaluator; then the ratios against TRL.

Needs the bench extra: pip install -e '.[train,bench]'

Run: python benchmarks/bench_vs_trl.py [--updates 48] [--work runs/bench_vs_trl]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def reverse_reward(completions, answer, **kwargs):
    """TRL's signature: 1 for the exact reversal, else half the share of positions right."""
    out = []
    for c, a in zip(completions, answer, strict=True):
        c = c.strip()
        hits = sum(x == y for x, y in zip(c, a, strict=False))
        out.append(1.0 if c == a else 0.5 * hits / max(len(c), len(a), 1))
    return out


# --- set-up: data, model -------------------------------------------------------------------


def make_data(work: Path, n_train: int, n_test: int, max_len: int) -> tuple[Path, Path]:
    from sortedrl.tasks.reverse import ReverseTask

    task = ReverseTask(max_len=max_len)
    paths = []
    for split, n in (("train", n_train), ("test", n_test)):
        path = work / f"{split}.jsonl"
        rows = [{"prompt": p.prompt, "answer": p.answer} for p in task.problems(split, n, seed=0)]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        paths.append(path)
    return paths[0], paths[1]


def make_model(work: Path, train_path: Path, steps: int) -> Path:
    """The embedded tiny Llama, warm-started on reference reversals, as a Hugging Face dir."""
    from sortedrl.models.tiny import build_char_tokenizer, build_tiny_model, save_tiny
    from sortedrl.tasks.reverse import ALPHABET
    from sortedrl.training.sft import supervised_warm_start

    target = work / "model"
    tokenizer = build_char_tokenizer(ALPHABET)
    model = build_tiny_model(len(tokenizer), seed=0)
    rows = [json.loads(x) for x in train_path.read_text().splitlines()]
    examples = [(r["prompt"], r["answer"]) for r in rows]
    supervised_warm_start(model, tokenizer, examples, steps=steps, batch_size=32, lr=3e-3, seed=0)
    save_tiny(model.eval(), tokenizer, target)
    return target


# --- one evaluator for every model ---------------------------------------------------------


class ExactReverse:
    """Held-out scoring for all runs: correct when the reversal is exact."""

    def score(self, problem, response):
        from sortedrl.tasks.base import Score

        ok = response.strip() == problem.answer
        return Score(1.0 if ok else 0.0, ok, True)

    def score_batch(self, items):
        return [self.score(problem, response) for problem, response in items]

    def close(self) -> None:
        pass


def held_out_accuracy(model_dir: Path, test_path: Path, n: int, max_new_tokens: int) -> float:
    from sortedrl.commands.evaluate import evaluate
    from sortedrl.models.tiny import load_tiny
    from sortedrl.tasks.dataset import DatasetTask

    model, tokenizer = load_tiny(model_dir)
    task = DatasetTask(path=str(test_path), eval_path=str(test_path), prompt_key="prompt")
    problems = task.problems("test", n, seed=0)
    res = evaluate(model, tokenizer, ExactReverse(), problems, max_new_tokens=max_new_tokens)
    return res["accuracy"]


# --- the runs ------------------------------------------------------------------------------


def run_trl(args: argparse.Namespace) -> dict:
    """TRL GRPOTrainer with its defaults where ours has no counterpart; CPU, generate()."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.manual_seed(0)
    work = Path(args.work)
    rows = [json.loads(x) for x in (work / "train.jsonl").read_text().splitlines()]
    model = AutoModelForCausalLM.from_pretrained(work / "model", local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(work / "model", local_files_only=True)
    g, u = args.group_size, args.prompts_per_update
    cfg = GRPOConfig(
        output_dir=str(work / "trl"),
        use_cpu=True,
        bf16=False,
        num_generations=g,
        per_device_train_batch_size=g * u,  # completions per optimizer step: u prompts x g
        gradient_accumulation_steps=1,
        steps_per_generation=1,
        num_iterations=1,
        max_steps=args.updates,
        max_completion_length=args.max_new_tokens,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.01,
        max_grad_norm=1.0,
        temperature=args.temperature,
        beta=0.0,
        epsilon=0.2,
        epsilon_high=0.28,
        loss_type="dapo",
        scale_rewards="group",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=0,
    )

    class Clock(TrainerCallback):
        start = end = 0.0

        def on_train_begin(self, *a, **k):
            Clock.start = time.perf_counter()

        def on_train_end(self, *a, **k):
            Clock.end = time.perf_counter()

    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reverse_reward,
        args=cfg,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=[Clock()],
    )
    spent = {"generate": 0.0, "reward": 0.0}

    def timed(name, fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[name] += time.perf_counter() - t0

        return wrapper

    # Where TRL's time goes: generation, reward, and the rest (mostly the update).
    trainer._generate = timed("generate", trainer._generate)
    trainer._calculate_rewards = timed("reward", trainer._calculate_rewards)
    trainer.train()
    loop_s = Clock.end - Clock.start
    logs = [h for h in trainer.state.log_history if "completions/mean_length" in h]
    tokens = sum(h["completions/mean_length"] * g * u for h in logs)
    trainer.save_model(str(work / "trl" / "model"))
    tokenizer.save_pretrained(work / "trl" / "model")
    return {
        "loop_time_s": loop_s,
        "updates": trainer.state.global_step,
        "samples_trained": trainer.state.global_step * g * u,
        "tokens_generated": tokens,
        "rollout_time_s": spent["generate"],
        "reward_time_s": spent["reward"],
        "model_dir": str(work / "trl" / "model"),
    }


def run_sortedrl(args: argparse.Namespace, name: str, policy: list[str]) -> dict:
    work = Path(args.work)
    out = work / name
    cmd = [
        sys.executable,
        "-m",
        "sortedrl.cli",
        "train",
        "--out",
        str(out),
        "--model",
        str(work / "model"),
        "--no-progress",
        "task.name=dataset",
        f"task.path={work / 'train.jsonl'}",
        f"task.eval_path={work / 'test.jsonl'}",
        "task.prompt_key=prompt",
        "task.answer_key=answer",
        "task.reward_fns=[bench_vs_trl:reverse_reward]",
        f"task.train_prompts={args.updates * args.prompts_per_update}",
        "task.eval_prompts=8",  # its own evals are not timed; ours below score every run
        "eval.sampled=0",
        "checkpoint.every_updates=0",
        f"scheduler.group_size={args.group_size}",
        f"scheduler.max_new_tokens={args.max_new_tokens}",
        f"rollout.temperature={args.temperature}",
        f"scheduler.update_batch={args.prompts_per_update}",
        f"trainer.lr={args.lr}",
        "trainer.warmup_steps=0",
        f"max_updates={args.updates}",
        *policy,
        *args.overrides,
    ]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), str(ROOT)]))
    subprocess.run(cmd, check=True, env=env)
    s = json.loads((out / "summary.json").read_text())
    return {
        "loop_time_s": s["loop_time_s"],
        "updates": s["updates"],
        "samples_trained": s["samples_trained"],
        "tokens_generated": s["tokens_generated"],
        "rollout_time_s": s["rollout_time_s"],
        "reward_time_s": s["reward_time_s"],
        "update_time_s": s["update_time_s"],
        "model_dir": str(out / "model"),
    }


RUNS = {
    "trl": None,
    "sortedrl-sync": ["scheduler.policy=sync"],
    "sortedrl-sorted": [],  # the default policy and settings
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="runs/bench_vs_trl")
    ap.add_argument("--updates", type=int, default=48)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--prompts-per-update", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--max-len", type=int, default=16, help="longest string to reverse")
    ap.add_argument("--warm-start-steps", type=int, default=300)
    ap.add_argument("--eval-prompts", type=int, default=200)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of every run (1: robust on a CPU shared with other work)",
    )
    ap.add_argument("--runs", default=",".join(RUNS))
    ap.add_argument("--only", choices=sorted(RUNS), help=argparse.SUPPRESS)  # one run, in-process
    ap.add_argument("overrides", nargs="*", help="extra sortedrl settings, KEY=VALUE")
    args = ap.parse_args()
    work = Path(args.work)
    # Every run, and the subprocesses, get the same number of threads.
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)

    if args.only == "trl":
        print(json.dumps(run_trl(args)), flush=True)
        return

    work.mkdir(parents=True, exist_ok=True)
    train_path, test_path = make_data(work, 4000, args.eval_prompts, args.max_len)
    model_dir = make_model(work, train_path, args.warm_start_steps)
    before = held_out_accuracy(model_dir, test_path, args.eval_prompts, args.max_new_tokens)
    print(f"warm-started model: held-out greedy accuracy {before:.3f}", flush=True)

    rows: dict[str, dict] = {}
    for name in args.runs.split(","):
        if name == "trl":
            argv = [sys.executable, __file__, "--only", "trl", *sys.argv[1:]]
            done = subprocess.run(argv, check=True, capture_output=True, text=True)
            row = json.loads(done.stdout.strip().splitlines()[-1])
        else:
            row = run_sortedrl(args, name, RUNS[name])
        row["acc_before"] = before
        row["acc_after"] = held_out_accuracy(
            Path(row["model_dir"]), test_path, args.eval_prompts, args.max_new_tokens
        )
        rows[name] = row
        print(name, json.dumps(row), flush=True)
    report(rows)
    (work / "results.json").write_text(json.dumps(rows, indent=2))


def report(rows: dict[str, dict]) -> None:
    base = rows.get("trl")
    print(
        "\n| run | samples/s | vs TRL | s per update | generated tok/s | vs TRL "
        "| held-out acc before -> after | gain | rollout / reward / rest (s) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, r in rows.items():
        sps = r["samples_trained"] / r["loop_time_s"]
        tps = r["tokens_generated"] / r["loop_time_s"]
        vs = vs_tok = "-"
        if base:
            vs = f"{sps / (base['samples_trained'] / base['loop_time_s']):.2f}"
            vs_tok = f"{tps / (base['tokens_generated'] / base['loop_time_s']):.2f}"
        print(
            f"| {name} | {sps:.1f} | {vs} | {r['loop_time_s'] / r['updates']:.2f} | {tps:.0f} "
            f"| {vs_tok} | {r['acc_before']:.3f} -> {r['acc_after']:.3f} "
            f"| {r['acc_after'] - r['acc_before']:+.3f} "
            f"| {r['rollout_time_s']:.0f} / {r['reward_time_s']:.0f} / "
            f"{r['loop_time_s'] - r['rollout_time_s'] - r['reward_time_s']:.0f} |"
        )


if __name__ == "__main__":
    main()
