"""A continuous-batching rollout engine on a plain transformers causal LM (CPU or GPU).

How it decodes
--------------
The engine runs its own decode loop over the model's ordinary `forward`, with a KV cache it
manages itself (`SlotKV`): one preallocated buffer per layer of shape
`[capacity, kv_heads, columns, head_dim]`. The running batch occupies rows `0..B-1`; every
row is *right-aligned* at the shared write column `T`, so a row's tokens fill columns
`start[row]..T-1` and the columns before `start[row]` are masked out. One decode step feeds
every row's last sampled token, writes its keys and values at column `T` (in place, no
concatenation), attends over columns `0..T` with a 4-D boolean mask and per-row position ids,
and samples the next token of every row from one batched forward.

Continuous batching: a sequence that finishes leaves at once (the last row is moved into its
slot, so the batch stays dense); queued requests join at the start of the next `step`, up to
`capacity`: they are prefilled together in one forward, written straight into free rows
(right-aligned at `T`, shifting the running rows right first when a new prompt is longer than
`T`), and sample their first token from the prefill. When every running row has a padded
prefix, the dead columns are dropped (compaction).

This measured faster on a 2-core CPU than transformers' own continuous batching manager
(`model.init_continuous_batching`, paged attention): see `benchmarks/bench_engine.py
--compare-hf-cb` and the module notes there. It also fits the synchronous `Engine.step`
protocol without a background thread.

Sampling and log-probs
----------------------
Tokens are sampled with a `torch.Generator` seeded with `seed`, so a fixed seed and a fixed
sequence of calls give the same tokens. With `temperature > 0` the token is drawn from
`softmax(logits / temperature)`, truncated to the nucleus `top_p` when `top_p < 1`. The
reported log-prob of a token is **`log_softmax(logits / temperature)` before top-p
truncation**, computed in fp32; with `temperature <= 0` sampling is greedy and the log-prob is
`log_softmax(logits)`. At temperature 1 it equals the log-prob a plain forward pass over
prompt + response assigns to the token (tested to 1e-4 in fp32).

A stop token is part of the response (its id and log-prob are returned, finish reason
`stop`); `max_new_tokens` caps the whole response, resumed prefix included (`length`).

Supported models: decoder-only causal LMs whose attention takes a 4-D mask and per-row
position ids with a transformers `Cache` (Llama, Qwen2/3, Mistral, ...). Sliding-window layers
are run with full attention.
"""

from __future__ import annotations

import copy
import inspect
import os
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from sortedrl.engines.config import ModelConfig, RolloutConfig
from sortedrl.engines.response import ResponseTrack
from sortedrl.engines.slot_kv import SlotKV
from sortedrl.scheduling.protocol import EngineBase, Generation, Request, StepReport

__all__ = ["TransformersEngine"]

#: KV columns allocated at first; the buffers grow by half when a batch needs more.
INITIAL_COLUMNS = 256


# --- sequences --------------------------------------------------------------------------------


@dataclass
class _Seq(ResponseTrack):
    start: int = 0  # first KV column of this row
    pending: int = -1  # last sampled token, not yet in the KV cache

    def add_one(self, token: int, logprob: float, version: int) -> None:
        self.add((token,), (logprob,), version)
        self.pending = token


# --- the engine -------------------------------------------------------------------------------


class TransformersEngine(EngineBase):
    """A continuous-batching `Engine` over a transformers causal LM (see the module docstring).

    Args:
        model: a causal LM (`AutoModelForCausalLM`); moved in place to `device` / `dtype`.
        tokenizer: used only for the default stop token (its `eos_token_id`); may be None.
        capacity: most sequences run at once.
        temperature, top_p: sampling; `temperature <= 0` is greedy.
        stop_token_ids: token ids that end a response; None means the tokenizer's eos (or
            the model's `eos_token_id`), `[]` disables stopping on tokens.
        seed: seed of the sampling generator.
        device, dtype: where and in which precision the model runs.
        min_admit: while sequences are running, wait until this many slots are free (or the
            queue fits) before prefilling newcomers; 1 admits at once.
        reprefill_on_load: when `load_weights` changes the weights under running sequences,
            drop their KV cache and re-prefill them (prompt + tokens so far) with the new
            weights at the next `step`. Off by default: they continue on the KV cache the old
            weights computed, as vLLM does.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        capacity: int = 32,
        temperature: float = 1.0,
        top_p: float = 1.0,
        stop_token_ids: Iterable[int] | None = None,
        seed: int = 0,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        min_admit: int = 1,
        reprefill_on_load: bool = False,
    ):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        self.device = torch.device(device)
        self.model = model.to(device=self.device, dtype=dtype) if dtype else model.to(self.device)
        self.model.eval()
        self.tokenizer = tokenizer
        self._capacity = int(capacity)
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.min_admit = max(1, int(min_admit))
        self.reprefill_on_load = bool(reprefill_on_load)
        if stop_token_ids is None:
            eos = getattr(tokenizer, "eos_token_id", None)
            if eos is None:
                eos = getattr(model.config, "eos_token_id", None)
            stop_token_ids = [] if eos is None else ([eos] if isinstance(eos, int) else eos)
        self.stop_token_ids = frozenset(int(t) for t in stop_token_ids)
        self.pad_token_id = self._pad_id(tokenizer, model)
        self.seed = seed
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)
        self._version = 0

        cfg = model.config.get_text_config(decoder=True)
        self._num_layers = int(cfg.num_hidden_layers)
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._has_logits_to_keep = "logits_to_keep" in params

        self._queue: deque[_Seq] = deque()
        self._rows: list[_Seq] = []  # the running batch, row i of the KV buffers
        self._ids: set[str] = set()  # unfinished request ids
        self._kv: SlotKV | None = None
        self._T = 0  # shared write column
        self._finished_at_admit = 0
        # Counters for the caller's curiosity.
        self.stats = {"steps": 0, "prefills": 0, "compactions": 0, "shifts": 0}

    # --- protocol ---------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def version(self) -> int:
        return self._version

    def num_unfinished(self) -> int:
        return len(self._queue) + len(self._rows)

    def num_running(self) -> int:
        """Sequences in the running batch (at most `capacity`)."""
        return len(self._rows)

    def submit(self, requests: Sequence[Request]) -> None:
        seqs = []
        seen = set()
        for req in requests:
            if req.request_id in self._ids or req.request_id in seen:
                raise ValueError(
                    f"request id {req.request_id!r} is already unfinished in the engine"
                )
            seen.add(req.request_id)
            seqs.append(_Seq.from_request(req))
        for s in seqs:
            self._ids.add(s.request.request_id)
            self._queue.append(s)

    def step(self) -> StepReport:
        report = StepReport()
        if not self._queue and not self._rows:
            return report
        t0 = time.perf_counter()
        with torch.inference_mode():
            self._admit(report)
            busy_rows = len(self._rows) + self._finished_at_admit
            if self._rows:
                self._decode(report)
        report.elapsed_s = time.perf_counter() - t0
        report.busy_slot_s = busy_rows * report.elapsed_s
        self.stats["steps"] += 1
        return report

    def abort(self, request_ids: Sequence[str]) -> list[Generation]:
        wanted = set(request_ids) & self._ids
        if not wanted:
            return []
        out: list[Generation] = []
        keep = deque()
        for s in self._queue:
            if s.request.request_id in wanted:
                out.append(s.generation("abort"))
            else:
                keep.append(s)
        self._queue = keep
        drop = [i for i, s in enumerate(self._rows) if s.request.request_id in wanted]
        for i in drop:
            out.append(self._rows[i].generation("abort"))
        with torch.inference_mode():
            self._remove_rows(drop)
        for g in out:
            self._ids.discard(g.request_id)
        return out

    def pause(self) -> list[Generation]:
        out = [s.generation("abort") for s in self._rows]
        out += [s.generation("abort") for s in self._queue]
        self._rows, self._queue = [], deque()
        self._ids.clear()
        self._T = 0
        if self._kv is not None:
            self._kv.free()
        self._kv = None
        return out

    def rng_state(self) -> torch.Tensor:
        """The sampling generator's state (optional protocol method, for checkpoints)."""
        return self.generator.get_state()

    def set_rng_state(self, state: torch.Tensor) -> None:
        """Restore a state from `rng_state()`: the same calls then sample the same tokens."""
        self.generator.set_state(state)

    def load_weights(self, weights: Any, version: int) -> float:
        """Copy `weights` (a state dict of tensors, or None for weights already in place) into
        the model in place, and serve them as `version`. A tied weight may come once, under
        its first name (as the model's files hold it).

        Later tokens of running sequences carry `version`. Their keys and values so far were
        computed by the old weights; unless `reprefill_on_load` is set, decoding continues on
        that cache, and each reported log-prob is that of the distribution the token was
        actually sampled from (new weights over the old cache).
        """
        t0 = time.perf_counter()
        if weights is not None:
            if not isinstance(weights, Mapping):
                raise TypeError(f"load_weights expects a state dict, got {type(weights).__name__}")
            with torch.no_grad():
                own = self.model.state_dict()
                # Tied names share one tensor: the first name's copy fills them all.
                firsts = {n for n, _ in self.model.named_parameters()}
                tied = {n for n, _ in self.model.named_parameters(remove_duplicate=False)} - firsts
                missing = [k for k in own if k not in weights and k not in tied]
                unexpected = [k for k in weights if k not in own]
                if missing or unexpected:
                    raise ValueError(
                        f"load_weights: state dict does not match the model "
                        f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
                    )
                for k, dst in own.items():
                    if k not in weights:  # tied: filled through its first name
                        continue
                    src = weights[k]
                    if src.data_ptr() != dst.data_ptr():
                        dst.copy_(src)
        self._version = int(version)
        if self.reprefill_on_load and self._rows:
            # Back to the head of the queue, in row order; `_admit` prefills prompt + tokens.
            self._queue.extendleft(reversed(self._rows))
            self._rows = []
            self._T = 0
        return time.perf_counter() - t0

    # --- internals --------------------------------------------------------------------------

    @staticmethod
    def _pad_id(tokenizer: Any, model: Any) -> int:
        for src in (tokenizer, model.config):
            pid = getattr(src, "pad_token_id", None)
            if isinstance(pid, int):
                return pid
        return 0

    def _forward(self, input_ids, attention_mask, position_ids, last_only: bool) -> torch.Tensor:
        kwargs = {self._cache_kw: self._kv, "use_cache": True}
        if last_only and self._has_logits_to_keep:
            kwargs["logits_to_keep"] = 1
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **kwargs,
        )
        return out.logits[:, -1, :].float()

    def _sample(self, logits: torch.Tensor) -> tuple[list[int], list[float]]:
        """Sample one token per row of `logits` `[n, vocab]` (fp32)."""
        if self.temperature <= 0:
            logp = torch.log_softmax(logits, dim=-1)
            tok = logp.argmax(dim=-1, keepdim=True)
        else:
            logp = torch.log_softmax(logits / self.temperature, dim=-1)
            probs = logp.exp()
            if self.top_p < 1.0:
                sorted_p, order = probs.sort(dim=-1, descending=True)
                cum = sorted_p.cumsum(dim=-1)
                sorted_p = sorted_p.masked_fill(cum - sorted_p > self.top_p, 0.0)
                probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
            tok = torch.multinomial(probs, 1, generator=self.generator)
        lp = logp.gather(-1, tok).squeeze(-1)
        return tok.squeeze(-1).tolist(), lp.tolist()

    def _finish_reason(self, s: _Seq) -> str | None:
        if s.token_ids and s.token_ids[-1] in self.stop_token_ids:
            return "stop"
        if len(s.token_ids) >= s.request.max_new_tokens:
            return "length"
        return None

    def _remove_rows(self, idx: Iterable[int]) -> None:
        """Drop rows (swap-with-last) so the running batch stays dense."""
        for i in sorted(set(idx), reverse=True):
            last = len(self._rows) - 1
            if i != last:
                self._rows[i] = self._rows[last]
                assert self._kv is not None
                self._kv.move_row(last, i, self._T)
            self._rows.pop()
        if not self._rows:
            self._T = 0
        else:
            self._compact()

    def _compact(self, force: bool = False) -> None:
        """Drop the leading columns that are padding in every running row."""
        if not self._rows or self._kv is None:
            return
        lo = min(s.start for s in self._rows)
        if lo > 0 and (force or (lo >= 32 and lo * 4 >= self._T)):
            self._kv.shift(len(self._rows), lo, 0, self._T - lo)
            for s in self._rows:
                s.start -= lo
            self._T -= lo
            self.stats["compactions"] += 1

    def _admit(self, report: StepReport) -> None:
        self._finished_at_admit = 0
        free = self._capacity - len(self._rows)
        if not self._queue or free <= 0:
            return
        if self._rows and free < min(self.min_admit, len(self._queue)):
            return
        new: list[_Seq] = []
        while self._queue and len(new) < free:
            s = self._queue.popleft()
            reason = self._finish_reason(s)  # a resumed partial may already be complete
            if reason is not None or s.request.max_new_tokens == 0:
                report.finished.append(s.generation(reason or "length"))
                self._ids.discard(s.request.request_id)
                continue
            new.append(s)
        if not new:
            return
        seqs = [list(s.request.prompt_token_ids) + s.token_ids for s in new]  # type: ignore[operator]
        lens = [len(x) for x in seqs]
        P, n, B = max(lens), len(new), len(self._rows)
        if self._kv is None:
            self._kv = SlotKV(self._num_layers, self._capacity, columns=max(INITIAL_COLUMNS, 2 * P))
        kv = self._kv
        if self._T < P:  # shift the running rows right so the newcomers fit left of column T
            d = P - self._T
            kv.ensure_columns(P + 1)
            kv.shift(B, 0, d, self._T)
            for s in self._rows:
                s.start += d
            self._T = P
            if B:
                self.stats["shifts"] += 1
        kv.ensure_columns(self._T + 1)
        T = self._T
        dev = self.device
        ids = torch.full((n, P), self.pad_token_id, dtype=torch.long)
        pos = torch.zeros((n, P), dtype=torch.long)
        valid = torch.zeros((n, P), dtype=torch.bool)
        for j, (x, L) in enumerate(zip(seqs, lens, strict=True)):
            ids[j, P - L :] = torch.tensor(x, dtype=torch.long)
            pos[j, P - L :] = torch.arange(L)
            valid[j, P - L :] = True
        ar = torch.arange(P)
        mask = (ar[None, :, None] >= ar[None, None, :]) & valid[:, None, :]  # [n, P(q), P(k)]
        mask |= torch.eye(P, dtype=torch.bool)[None]  # padded queries see themselves (no NaN)
        kv.rows, kv.write_start, kv.window_start = slice(B, B + n), T - P, T - P
        logits = self._forward(ids.to(dev), mask[:, None].to(dev), pos.to(dev), last_only=True)
        toks, lps = self._sample(logits)
        report.prefill_tokens += sum(lens)
        report.tokens_generated += n
        self.stats["prefills"] += 1
        done = []
        for j, (s, t, lp, L) in enumerate(zip(new, toks, lps, lens, strict=True)):
            s.start = T - L
            s.add_one(t, lp, self._version)
            self._rows.append(s)
            reason = self._finish_reason(s)
            if reason is not None:
                report.finished.append(s.generation(reason))
                self._ids.discard(s.request.request_id)
                done.append(B + j)
        self._finished_at_admit = len(done)
        if done:
            self._remove_rows(done)

    def _decode(self, report: StepReport) -> None:
        kv = self._kv
        assert kv is not None
        if self._T + 1 > kv.columns:
            self._compact(force=True)  # rather than grow the buffers
        B, T = len(self._rows), self._T
        kv.ensure_columns(T + 1)
        starts = torch.tensor([s.start for s in self._rows], dtype=torch.long)
        ids = torch.tensor([[s.pending] for s in self._rows], dtype=torch.long)
        pos = (T - starts)[:, None]
        mask = torch.arange(T + 1)[None, :] >= starts[:, None]  # [B, T+1]
        kv.rows, kv.write_start, kv.window_start = slice(0, B), T, 0
        dev = self.device
        logits = self._forward(ids.to(dev), mask[:, None, None].to(dev), pos.to(dev), False)
        self._T = T + 1
        toks, lps = self._sample(logits)
        report.tokens_generated += B
        done = []
        for i, (s, t, lp) in enumerate(zip(self._rows, toks, lps, strict=True)):
            s.add_one(t, lp, self._version)
            reason = self._finish_reason(s)
            if reason is not None:
                report.finished.append(s.generation(reason))
                self._ids.discard(s.request.request_id)
                done.append(i)
        if done:
            self._remove_rows(done)


def build_transformers_engine(
    rollout: RolloutConfig,
    model_cfg: ModelConfig,
    seed: int,
    model: Any,
    tokenizer: Any,
    version: int,
    *,
    tensor_parallel_size: int = 1,
) -> TransformersEngine:
    """The engine of `rollout.engine=transformers` (its entry in `engines/registry.py`);
    `model` is a model object or a model directory (loaded for this engine alone)."""
    if tensor_parallel_size != 1:
        raise ValueError(
            f"cluster.tensor_parallel_size={tensor_parallel_size}: the transformers engine "
            "runs on one device"
        )
    if isinstance(model, str | os.PathLike):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model, dtype="auto")
    else:
        model = copy.deepcopy(model)  # its own weights: the trainer changes `model` meanwhile
    dtype = rollout.dtype
    engine = TransformersEngine(
        model,
        tokenizer,
        capacity=rollout.capacity,
        temperature=rollout.temperature,
        top_p=rollout.top_p,
        seed=seed,
        device=model_cfg.device,
        dtype=None if dtype in (None, "auto") else getattr(torch, dtype),
    )
    engine.load_weights(None, version)  # the copied weights are policy `version`
    return engine
