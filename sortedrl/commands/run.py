"""A training run in progress: the loop's scorer and update hook, checkpoints and engine
restarts are the methods of one object, `Run`, which owns the run's mutable state."""

from __future__ import annotations

import random
import signal
import time
from pathlib import Path
from typing import Any

from sortedrl.commands.checkpoint import complete_checkpoints, save_checkpoint
from sortedrl.commands.evaluate import evaluate_run
from sortedrl.commands.logger import RunLogger
from sortedrl.commands.prepare import RunProblems
from sortedrl.commands.runstate import RunState
from sortedrl.config import TrainConfig
from sortedrl.errors import SortedRLError, TrainerFailedError
from sortedrl.scheduling.controller import Controller
from sortedrl.scheduling.loop import EngineFailedError, RunResult, run
from sortedrl.scheduling.metrics import Clock
from sortedrl.scheduling.protocol import Backend, CheckpointedTrainer, Engine
from sortedrl.tasks.base import Score
from sortedrl.tasks.reward_report import FailureConsole, RewardReport, failure_totals
from sortedrl.tasks.scoring import Scorer, score_generations
from sortedrl.tasks.user_rewards import reward_fn_names


class NumericalError(SortedRLError):
    """Too many non-finite updates in a row."""


class RewardFunctionError(SortedRLError):
    """One of your reward functions failed on every call for `task.reward_fail_updates`
    updates in a row: the run stopped with a checkpoint."""


class RunInterrupted(SortedRLError):
    """SIGTERM or SIGINT: the run was checkpointed and can go on with --resume."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum


class Run:
    """One run of the loop over `controller`, `trainer` and a rollout engine it builds."""

    def __init__(
        self,
        cfg: TrainConfig,
        out: Path,
        *,
        model: Any,
        tokenizer: Any,
        problems: RunProblems,
        scorer: Scorer,
        trainer: CheckpointedTrainer,
        backend: Backend,
        controller: Controller,
        state: RunState,
        logger: RunLogger,
        t_start: float,
        console: FailureConsole | None = None,
    ) -> None:
        self.cfg, self.model, self.tokenizer = cfg, model, tokenizer
        self.problems, self.scorer, self.trainer = problems, scorer, trainer
        self.backend = backend  # builds the engine (sortedrl.commands.backend)
        self.controller, self.state, self.logger = controller, state, logger
        self.out = out
        self.ckpt_root = out / "checkpoints"
        self.t_start = t_start
        self.elapsed_before = state.elapsed_s
        self.scores = {(row[0], row[1]): _score_of(row) for row in state.scores}
        self.reward_names = reward_fn_names(cfg.task.reward_fns)
        self.console = console if console is not None else FailureConsole()
        self.reward_error: RewardFunctionError | None = None  # set: the loop stops
        self.skipped_in_a_row = 0
        self.prompts_trained = sum(int(h["groups"]) for h in state.history)
        self.stop_signum: int | None = None
        # Async: the trainer changes `model` in its own thread, so a restarted engine takes
        # the weights of the last update, copied when the trainer was idle.
        # A backend whose engine restarts itself keeps the weights it needs (the replica pool
        # holds the last reference): no copy here.
        self.safe_weights: tuple[int, dict[str, Any]] | None = None
        self.snapshots = not controller.colocated and not backend.engine_restarts_itself
        if self.snapshots:
            self._snapshot_weights()
        self.engine: Engine = self._build_engine()
        self.clock = Clock(self.engine.capacity)

    # --- the loop's callbacks -----------------------------------------------------------------

    def score(self, generations: list[Any], keys: list[Any]) -> tuple[list[float], float]:
        """Rewards of finished responses (sandboxed), kept until their group is trained.
        Responses scored where they were generated (`Generation.score`, the Ray replicas)
        are not scored again, and take no reward time here."""
        t0 = time.perf_counter()
        todo = [i for i, g in enumerate(generations) if g.score is None]
        items = [(self.problems.by_id[keys[i][0]], generations[i].token_ids) for i in todo]
        results = [g.score for g in generations]
        for i, s in zip(todo, score_generations(self.scorer, self.tokenizer, items), strict=True):
            results[i] = s
        for key, s in zip(keys, results, strict=True):
            self.scores[tuple(key)] = s
            self.console.show(s, f"prompt {key[0]!r}")
        return [float(s.reward) for s in results], (time.perf_counter() - t0) if todo else 0.0

    def on_update(self, record: Any, batch: Any, result: Any) -> None:
        """Log the update, evaluate and checkpoint when due, stop on non-finite updates."""
        line, rewards = self._metrics_line(record, batch)
        if self.cfg.eval.every_updates and record.step % self.cfg.eval.every_updates == 0:
            ev = self.evaluate()
            self.state.evals.append({"step": record.step, **ev})
            line["eval_accuracy"] = ev["accuracy"]
            line["eval_reward_mean"] = ev["reward_mean"]
        self.state.history.append(line)
        lengths = [(g.prompt_id, [s.n_tokens for s in g.samples]) for g in batch.groups]
        self.logger.update(line, lengths)
        self.state.trace_lines = self.logger.trace_lines
        if self.snapshots:
            self._snapshot_weights()  # the trainer is idle now: a safe point
        self._watch_rewards(rewards, record.step)
        self.skipped_in_a_row = self.skipped_in_a_row + 1 if record.skipped else 0
        if self.skipped_in_a_row >= self.cfg.max_skipped_updates:
            last = complete_checkpoints(self.ckpt_root)
            raise NumericalError(
                f"{self.skipped_in_a_row} updates in a row had a non-finite loss or gradient "
                f"and were skipped; stopping. "
                + (f"The last checkpoint, {last[-1]}, is intact." if last else "")
            )
        every = self.cfg.checkpoint.every_updates
        if every and record.step % every == 0 and self.controller.colocated:
            if self.engine.num_unfinished():  # the engine kept its responses over the update
                self.controller.stop(self.engine.pause())  # they resume first, after this
            self.checkpoint(record.step)  # nothing runs now: the state is complete

    def restart_engine(self) -> Engine:
        """A fresh engine serving the current policy version (after the old one failed)."""
        try:
            self.engine.close()  # e.g. vLLM: free its memory and threads
        except Exception as e:  # it failed already; a failing close must not stop the run
            print(f"warning: closing the failed engine: {e}")
        self.engine = self._build_engine()
        if self.safe_weights is not None:  # never weights the trainer is changing right now
            version, weights = self.safe_weights
            self.engine.load_weights(weights, version)
        return self.engine

    # --- the run's own actions ----------------------------------------------------------------

    def pull_weights(self) -> None:
        """Bring `model` up to date where the trainer hands its weights on by reference (the
        Ray trainer ranks) instead of loading them into it at every update."""
        pull = getattr(self.trainer, "pull_weights", None)
        if pull is not None:
            pull()

    def evaluate(self) -> dict[str, Any]:
        """Evaluate the current policy: on the Ray replicas where the backend can, else on
        the driver's model (brought up to date first)."""
        generate = self.backend.evaluator(self.engine)
        if generate is None:
            self.pull_weights()
        return evaluate_run(
            self.cfg,
            self.model,
            self.tokenizer,
            self.scorer,
            self.problems.eval,
            self.console,
            generate,
        )

    def checkpoint(self, step: int) -> Path:
        """Write checkpoint `step`: weights, trainer, every RNG, controller and run state."""
        import torch

        rng: dict[str, Any] = {
            "torch": torch.get_rng_state(),
            "python": _to_lists(random.getstate()),
        }
        try:
            engine_rng = self.engine.rng_state()
            if engine_rng is not None:
                rng["engine"] = engine_rng
        except Exception as e:  # a failed engine: the run resumes with a fresh sampler
            print(f"warning: the engine's sampling RNG is not in this checkpoint ({e})")
        self.state.elapsed_s = self.elapsed_now()
        self.state.scores = [_score_row(k, v) for k, v in self.scores.items()]
        saved_clock = self.state.clock
        doc = self.state.model_copy(update={"clock": saved_clock.plus(self.clock)}).to_json()
        # Trainer ranks whose shards hold the weights: the driver's model is not written (nor
        # brought up to date for it); else the checkpoint's weights are the driver's model's.
        sharded = getattr(self.trainer, "checkpoint_holds_weights", False)
        if not sharded:
            self.pull_weights()
        return save_checkpoint(
            self.ckpt_root,
            step,
            model=None if sharded else self.model,
            trainer_state={"trainer": None, "rng": rng},  # "trainer": the trainer's own part
            trainer_part=lambda folder: self.trainer.save_checkpoint(str(folder)),
            controller_state=self.controller.state_dict(),
            run_state=doc,
            keep=self.cfg.checkpoint.keep,
        )

    def restore_rng(self, rng: dict[str, Any]) -> None:
        """The RNG states of a checkpoint: torch's, Python's and the engine's sampler."""
        import torch

        torch.set_rng_state(rng["torch"])
        random.setstate(_to_tuple(rng["python"]))
        if "engine" in rng:
            try:
                self.engine.set_rng_state(rng["engine"])
            except ValueError as e:  # e.g. another number of replicas: sampling differs
                print(f"warning: the engine's sampling RNG was not restored ({e})")

    def elapsed_now(self) -> float:
        """Wall time of the whole run so far, earlier segments included."""
        return self.elapsed_before + time.perf_counter() - self.t_start

    def execute(self, pause_for_update: bool) -> RunResult:
        """Run the loop; SIGTERM / SIGINT stop it at the next engine step. An engine that
        keeps failing stops the run with a checkpoint."""
        previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                previous[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread: no signal handling
                pass
        try:
            with self.logger:
                result = run(
                    self.controller,
                    self.engine,
                    self.trainer,
                    scorer=self.score,
                    on_update=self.on_update,
                    max_updates=self.cfg.max_updates,
                    should_stop=lambda: (
                        self.stop_signum is not None or self.reward_error is not None
                    ),
                    # An engine that restarts itself and gave up stops the run.
                    restart_engine=(
                        None if self.backend.engine_restarts_itself else self.restart_engine
                    ),
                    max_engine_failures=self.cfg.max_engine_failures,
                    pause_for_update=pause_for_update,
                    clock=self.clock,
                )
        except EngineFailedError as e:
            where = self.checkpoint(len(self.state.history))
            raise SortedRLError(
                f"{e}; checkpoint written to {where}; resume with --resume auto"
            ) from e
        except TrainerFailedError as e:  # its state is lost with it: no checkpoint now
            last = complete_checkpoints(self.ckpt_root)
            where = f"the last checkpoint is {last[-1]}" if last else "there is no checkpoint yet"
            raise TrainerFailedError(f"{e} ({where})") from e
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.logger.close_logs()
        self.engine = result.engine
        final = self.checkpoint(len(self.state.history))
        if self.reward_error is not None:
            raise RewardFunctionError(
                f"{self.reward_error}; checkpoint written to {final}; fix the function, then "
                "go on with --resume auto"
            )
        if result.stopped and self.stop_signum is not None:
            raise RunInterrupted(
                self.stop_signum,
                f"stopped by {signal.Signals(self.stop_signum).name} after "
                f"{len(self.state.history)} updates; checkpoint written to {final}; "
                "go on with --resume auto",
            )
        return result

    def finish(self, out: Path, result: RunResult) -> dict[str, Any]:
        """After the loop: evaluate, save the model, draw the report; returns the evaluation."""
        self.model.eval()
        eval_after = self.evaluate()  # on the driver's model: pulls the last weights first
        steps = len(self.state.history)
        if not self.state.evals or self.state.evals[-1]["step"] != steps:
            self.state.evals.append({"step": steps, **eval_after})
        assert self.state.eval_before is not None
        self.logger.evals(self.state.eval_before, eval_after, steps)
        export = getattr(self.trainer, "export_pretrained", None)
        if export is not None:  # the trainer ranks write it, a tensor at a time
            export(str(out / "model"))
        else:
            self.model.save_pretrained(out / "model", safe_serialization=True)
        self.tokenizer.save_pretrained(out / "model")
        self.logger.report(
            out / "report.png",
            self.state.history,
            self.state.evals,
            result.clock,
            result.engine.capacity,
        )
        return eval_after

    def summary(
        self,
        result: RunResult,
        eval_after: dict[str, Any],
        *,
        resumed_from: str | None,
        model_time_s: float,
    ) -> dict[str, Any]:
        """`summary.json`: the loop's summary with its times over every segment of the run."""
        doc = {
            **result.summary,
            **self.state.clock.plus(result.clock).summary_times(
                result.engine.capacity,
                result.summary["tokens_trained"],
                result.summary["samples_trained"],
            ),
            "resumed_from": resumed_from,
            "model_time_s": model_time_s,
            "eval_before": self.state.eval_before,
            "eval_after": eval_after,
            "evals": self.state.evals,
            "train_records": self.problems.train_records,
            "prompts_too_long": self.problems.too_long,  # too long for the model's context
            "epochs": self.problems.epochs(self.prompts_trained),
            "engine_stats": dict(result.engine.stats),
            # {function: {kind: count}} over every update of the run (see reward_report)
            "reward_failures": failure_totals(self.state.history),
            "config": self.cfg.model_dump(mode="json"),
            "out_dir": str(self.out),
        }
        doc["loop_time_s"] = doc["wall_time_s"]  # the run loop's time, every segment
        doc["wall_time_s"] = self.elapsed_now()  # preparation and evaluation included
        return doc

    # --- internals ------------------------------------------------------------------------------

    def _build_engine(self) -> Engine:
        return self.backend.engine(
            self.model, self.tokenizer, self.controller.version, self.problems.by_id
        )

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.stop_signum is None:
            self.stop_signum = signum

    def _snapshot_weights(self) -> None:
        weights = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
        self.safe_weights = (self.controller.version, weights)

    def _watch_rewards(self, rewards: RewardReport, step: int) -> None:
        """Count the updates in a row on which a function failed on every call; at
        `task.reward_fail_updates` the loop stops (`execute` checkpoints and raises)."""
        streak = self.state.reward_fail_streak
        broken = rewards.failed_every_call()
        for name in rewards.names:
            if rewards.calls[name]:
                streak[name] = streak.get(name, 0) + 1 if name in broken else 0
        limit = self.cfg.task.reward_fail_updates
        over = [n for n in rewards.names if limit and streak.get(n, 0) >= limit]
        if over and self.reward_error is None:
            name = over[0]
            kinds = ", ".join(f"{k} {c}" for k, c in sorted(rewards.failures[name].items()))
            self.reward_error = RewardFunctionError(
                f"reward function {name!r} failed on every call for {streak[name]} updates in a "
                f"row (task.reward_fail_updates={limit}; at update {step}: {kinds}); "
                f"its last message: {rewards.messages[name][-1]}"
            )

    def _metrics_line(self, record: Any, batch: Any) -> tuple[dict[str, Any], RewardReport]:
        n_correct = n = 0
        rewards = RewardReport(self.reward_names)
        for g in batch.groups:
            for s in g.samples:
                sc = self.scores.pop((g.prompt_id, s.sample_index), None)
                n += 1
                n_correct += int(bool(sc is not None and sc.correct))
                if sc is not None:
                    rewards.add(sc)
        self.state.samples_trained += record.samples
        self.prompts_trained += record.groups
        line: dict[str, Any] = {
            "step": record.step,
            "policy_version": record.policy_version,
            "reward_mean": record.reward_mean,
            "accuracy": n_correct / n if n else 0.0,
            "response_len_mean": record.response_len_mean,
            "bubble_ratio": record.bubble_ratio,
            "max_staleness_trained": record.max_staleness_trained,
            "mean_staleness_trained": record.mean_staleness_trained,
            "groups": record.groups,
            "samples": record.samples,
            "tokens": record.tokens,
            "samples_trained": self.state.samples_trained,
            "skipped": record.skipped,
            # Passes over the training records so far (trained prompts / records).
            "epoch": self.problems.epochs(self.prompts_trained),
            "time_s": self.elapsed_now(),
            "loop_time_s": record.time_s,
        }
        for k, v in record.stats.items():
            if isinstance(v, int | float) and not isinstance(v, bool):
                line[f"train/{k}"] = float(v)
        line.update(rewards.metrics())
        return line, rewards


def _score_row(key: tuple[str, int], s: Score) -> tuple[Any, ...]:
    row = (key[0], key[1], s.reward, s.correct, s.format_ok)
    return (*row, list(s.parts)) if s.parts else row


def _score_of(row: tuple[Any, ...]) -> Score:
    parts = tuple((str(n), v, f) for n, v, f in row[5]) if len(row) > 5 else ()
    return Score(row[2], row[3], row[4], parts=parts)


def _to_lists(x: Any) -> Any:
    return [_to_lists(v) for v in x] if isinstance(x, tuple | list) else x


def _to_tuple(x: Any) -> Any:
    return tuple(_to_tuple(v) for v in x) if isinstance(x, list) else x
