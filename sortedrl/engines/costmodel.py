"""A roofline cost model of LLM rollout and training, and the presets the simulator runs.

Decode is modelled per replica (one tensor-parallel group running its own engine) as
`max(memory time, compute time) + fixed overhead` per step, prefill and training as compute
bound. The numbers are deliberately simple and written beside their sources so that a reader
can check them; they aim at the right order of magnitude, not at a particular vLLM release.

All functions are pure: no I/O, no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from sortedrl.errors import ConfigError

GiB = 2**30


class CostModelError(ConfigError):
    """A preset that cannot run: the weights or one max-length sequence do not fit."""


@dataclass(frozen=True)
class ModelSpec:
    """The shape of a decoder-only transformer, as far as time and memory go."""

    name: str
    params: float  # all parameters, embeddings included (they are read and trained)
    layers: int
    kv_heads: int
    head_dim: int
    q_heads: int  # attention FLOPs scale with the query heads
    dtype_bytes: int = 2  # bf16 weights and KV cache
    source: str = ""

    @property
    def weight_bytes(self) -> float:
        return self.params * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        # K and V, every layer, every KV head.
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes

    @property
    def attn_flops_coef(self) -> float:
        """FLOPs of QK^T plus AV for one query token against one cached token, all layers."""
        return 4.0 * self.layers * self.q_heads * self.head_dim


@dataclass(frozen=True)
class AcceleratorSpec:
    """One GPU: peak numbers from the data sheet and the fraction of them software reaches."""

    name: str
    memory_bytes: float
    bandwidth_bytes_per_s: float
    flops_per_s: float  # dense bf16, no sparsity
    bandwidth_efficiency: float = 0.8  # achievable share of HBM bandwidth in decode GEMV
    decode_flops_efficiency: float = 0.5  # share of peak FLOP/s in batched decode GEMM
    prefill_mfu: float = 0.5  # share of peak FLOP/s in prefill
    source: str = ""


@dataclass(frozen=True)
class ClusterSpec:
    """A preset: the model, the accelerator, how many, and how rollout and training use them."""

    name: str
    model: ModelSpec
    accelerator: AcceleratorSpec
    gpus: int
    tp: int  # tensor-parallel size of one rollout replica; replicas = gpus // tp
    max_num_seqs: int  # per replica (vLLM's max_num_seqs)
    gpu_memory_utilization: float  # share of GPU memory the rollout engine may use
    reserve_bytes_per_gpu: float  # activations, CUDA graphs, NCCL buffers: not KV cache
    # The sequence shape the deployment is sized for (max_num_seqs and the KV check assume it);
    # the lengths responses actually take come from the workload (sortedrl.workload).
    prompt_len: int
    response_cap: int
    training_mfu: float
    step_overhead_s: float  # per decode step: scheduling, sampling, kernel launches
    allreduce_latency_s: float  # per tensor-parallel all-reduce (2 per layer per step)
    update_overhead_s: float  # per policy update: optimizer step, colocated context switch
    sync_bandwidth_bytes_per_s: float  # effective trainer -> engine weight transfer
    sync_overhead_s: float  # per weight sync: gather, reload, cache reset
    extra_forward_passes: int = 1  # per update, e.g. recomputing the proximal log-probs
    notes: str = ""

    def headline(self) -> str:
        """The numbers the preset rests on, in one line (`sortedrl simulate --help`)."""
        m, a = self.model, self.accelerator
        return (
            f"{self.name}: {m.name} ({m.params / 1e9:.3g}B params, {m.layers} layers, "
            f"{m.kv_heads} KV heads x {m.head_dim}) on {self.gpus} x {a.name} "
            f"({a.memory_bytes / GiB:.0f} GiB, {a.bandwidth_bytes_per_s / 1e12:.2f} TB/s, "
            f"{a.flops_per_s / 1e12:.0f} TFLOP/s bf16), tp {self.tp}, max_num_seqs "
            f"{self.max_num_seqs} per replica, prompt {self.prompt_len} + response cap "
            f"{self.response_cap} tokens"
        )

    def with_gpus(self, gpus: int) -> ClusterSpec:
        """The same preset on a different number of GPUs (async runs split them)."""
        return replace(self, gpus=gpus)


class CostModel:
    """Times and capacities derived from a `ClusterSpec`, validated on construction."""

    def __init__(self, spec: ClusterSpec, gpus: int | None = None):
        if gpus is not None:
            spec = spec.with_gpus(gpus)
        self.spec = spec
        m, a = spec.model, spec.accelerator
        where = f"preset '{spec.name}' (model {m.name}, accelerator {a.name})"
        if spec.tp < 1 or spec.gpus < spec.tp:
            raise CostModelError(
                f"{where}: needs at least one tensor-parallel group of {spec.tp} GPUs, "
                f"has {spec.gpus} GPUs"
            )
        if spec.max_num_seqs < 1:
            raise CostModelError(f"{where}: max_num_seqs must be >= 1")
        self.tp = spec.tp
        self.replicas = spec.gpus // spec.tp
        self.weight_bytes = m.weight_bytes
        self.kv_bytes_per_token = m.kv_bytes_per_token
        usable = spec.tp * (
            a.memory_bytes * spec.gpu_memory_utilization - spec.reserve_bytes_per_gpu
        )
        kv_bytes = usable - self.weight_bytes
        if kv_bytes <= 0:
            raise CostModelError(
                f"{where}: weights ({self.weight_bytes / GiB:.1f} GiB) do not fit in "
                f"{usable / GiB:.1f} GiB usable on {spec.tp} GPU(s); raise tp or "
                f"gpu_memory_utilization"
            )
        #: KV-cache capacity of one replica, in tokens.
        self.kv_capacity_tokens = int(kv_bytes // self.kv_bytes_per_token)
        longest = spec.prompt_len + spec.response_cap + 1
        if self.kv_capacity_tokens < longest:
            raise CostModelError(
                f"{where}: the KV cache holds {self.kv_capacity_tokens} tokens per replica, "
                f"less than one max-length sequence ({longest} tokens); raise tp or "
                f"gpu_memory_utilization, or lower response_cap"
            )
        # Decode step j of a replica: memory = _m0 + _m1 * kv, compute = _c0 * n + _c1 * kv,
        # where kv is the tokens read that step; weights and KV heads are split over tp.
        bw = spec.tp * a.bandwidth_bytes_per_s * a.bandwidth_efficiency
        fl = spec.tp * a.flops_per_s * a.decode_flops_efficiency
        self._m0 = self.weight_bytes / bw
        self._m1 = self.kv_bytes_per_token / bw
        self._c0 = 2.0 * m.params / fl
        self._c1 = m.attn_flops_coef / fl
        ar = 2 * m.layers * spec.allreduce_latency_s if spec.tp > 1 else 0.0
        self.step_overhead_s = spec.step_overhead_s + ar
        self._prefill_flops_per_s = spec.tp * a.flops_per_s * a.prefill_mfu

    # --- rollout ---------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        """Engine capacity C: sequences running at once over all replicas."""
        return self.replicas * self.spec.max_num_seqs

    def decode_step_time(self, n: int, kv_tokens: int) -> float:
        """One decode step of a replica running `n` sequences that hold `kv_tokens` tokens."""
        if n <= 0:
            return 0.0
        mem = self._m0 + self._m1 * kv_tokens
        comp = self._c0 * n + self._c1 * kv_tokens
        return max(mem, comp) + self.step_overhead_s

    def decode_steps_time(self, n: int, kv_tokens: int, k: int) -> float:
        """`k` consecutive decode steps with `n` sequences, KV growing by `n` per step.

        Closed form: each of the two roofline terms is linear in the step index, so the sum
        of their maximum splits at the one index where they cross.
        """
        if k <= 0 or n <= 0:
            return 0.0
        # memory(j) = a1 + b1*j, compute(j) = a2 + b2*j
        m1, c1 = self._m1, self._c1
        a1 = self._m0 + m1 * kv_tokens
        b1 = m1 * n
        a2 = self._c0 * n + c1 * kv_tokens
        b2 = c1 * n
        oh = self.step_overhead_s
        last = k - 1
        d0 = a1 - a2
        d_last = d0 + (b1 - b2) * last
        # Fast paths: one term dominates over the whole range (decode is usually memory bound).
        if d0 >= 0 and d_last >= 0:
            return k * (a1 + oh) + b1 * last * k / 2.0
        if d0 <= 0 and d_last <= 0:
            return k * (a2 + oh) + b2 * last * k / 2.0
        # memory - compute = d0 + (b1 - b2) * j changes sign once, at j = x.
        x = -d0 / (b1 - b2)
        split = min(max(math.ceil(x), 0), k)
        # Indices below `split` lie on one side of the crossing, the rest on the other.
        lo = (a1, b1) if d0 + (b1 - b2) * (split - 1) >= 0 else (a2, b2)
        hi = (a1, b1) if d0 + (b1 - b2) * split >= 0 else (a2, b2)
        return oh * k + _lin_sum(*lo, 0, split) + _lin_sum(*hi, split, k)

    def prefill_time(self, tokens: int) -> float:
        """Prefilling one sequence of `tokens` tokens (causal attention: ~t^2/2 pairs)."""
        if tokens <= 0:
            return 0.0
        m = self.spec.model
        flops = 2.0 * m.params * tokens + m.attn_flops_coef * tokens * tokens / 2.0
        return flops / self._prefill_flops_per_s

    # --- training ---------------------------------------------------------------------------

    def update_time(
        self,
        tokens: int,
        sum_sq_seq_len: float = 0.0,
        gpus: int | None = None,
        extra_forward_passes: int | None = None,
    ) -> float:
        """One policy update on `tokens` tokens (prompts included) on `gpus` GPUs.

        Forward + backward is 3 forward passes (6 FLOPs per parameter per token); each extra
        forward pass (old log-probs, reference model) adds 2. `sum_sq_seq_len` (sum over
        sequences of their squared length) adds the causal attention FLOPs.
        """
        s = self.spec
        g = s.gpus if gpus is None else gpus
        if g <= 0:
            raise ConfigError(f"preset '{s.name}': training needs at least one GPU, got {g}")
        extra = s.extra_forward_passes if extra_forward_passes is None else extra_forward_passes
        passes = 3 + extra
        m = s.model
        flops = passes * (2.0 * m.params * tokens + m.attn_flops_coef * sum_sq_seq_len / 2.0)
        return flops / (g * s.accelerator.flops_per_s * s.training_mfu) + s.update_overhead_s

    def weight_sync_time(self) -> float:
        """Moving new weights from the trainer into the rollout engine."""
        s = self.spec
        return self.weight_bytes / s.sync_bandwidth_bytes_per_s + s.sync_overhead_s

    # --- reporting --------------------------------------------------------------------------

    def describe(self) -> str:
        """The preset's numbers, what they are derived into, and where they come from."""
        s, m, a = self.spec, self.spec.model, self.spec.accelerator
        one = self.decode_step_time(1, s.prompt_len)
        full_kv = min(self.kv_capacity_tokens, s.max_num_seqs * (s.prompt_len + 2048))
        full = self.decode_step_time(s.max_num_seqs, full_kv)
        lines = [
            f"preset {s.name}: {s.gpus} x {a.name}, tp={s.tp}, {self.replicas} replica(s)",
            f"  model {m.name}: {m.params:.3g} params, {m.layers} layers, {m.q_heads} query / "
            f"{m.kv_heads} KV heads x {m.head_dim}, {m.dtype_bytes} bytes/value",
            f"    source: {m.source}",
            f"  accelerator {a.name}: {a.memory_bytes / GiB:.1f} GiB, "
            f"{a.bandwidth_bytes_per_s / 1e12:.2f} TB/s, {a.flops_per_s / 1e12:.0f} TFLOP/s "
            f"bf16 dense; efficiencies: bandwidth {a.bandwidth_efficiency}, decode FLOPs "
            f"{a.decode_flops_efficiency}, prefill MFU {a.prefill_mfu}",
            f"    source: {a.source}",
            f"  rollout: max_num_seqs {s.max_num_seqs}/replica (capacity {self.capacity}), "
            f"gpu_memory_utilization {s.gpu_memory_utilization}, reserve "
            f"{s.reserve_bytes_per_gpu / GiB:.1f} GiB/GPU, prompt {s.prompt_len}, "
            f"response cap {s.response_cap}",
            f"  training: MFU {s.training_mfu}, {s.extra_forward_passes} extra forward pass(es), "
            f"overhead {s.update_overhead_s} s/update; weight sync "
            f"{s.sync_bandwidth_bytes_per_s / 1e9:.0f} GB/s + {s.sync_overhead_s} s",
            "  derived:",
            f"    weights {self.weight_bytes / GiB:.1f} GiB, KV {self.kv_bytes_per_token / 1024:.0f}"
            f" KiB/token, KV capacity {self.kv_capacity_tokens} tokens/replica "
            f"(~{self.kv_capacity_tokens // (s.prompt_len + s.response_cap)} max-length "
            f"sequences)",
            f"    decode step: {one * 1e3:.1f} ms with 1 sequence, {full * 1e3:.1f} ms with "
            f"{s.max_num_seqs} (KV {full_kv} tokens) -> {s.max_num_seqs / full:.0f} tok/s/replica",
            f"    prefill of the prompt: {self.prefill_time(s.prompt_len) * 1e3:.1f} ms; weight "
            f"sync {self.weight_sync_time():.2f} s; update of 1M tokens "
            f"{self.update_time(1_000_000):.1f} s",
        ]
        if s.notes:
            lines.append(f"  notes: {s.notes}")
        return "\n".join(lines)


def _lin_sum(a: float, b: float, lo: int, hi: int) -> float:
    """sum of a + b*j for j in [lo, hi)."""
    c = hi - lo
    if c <= 0:
        return 0.0
    return c * a + b * (lo + hi - 1) * c / 2.0


# --- presets ----------------------------------------------------------------------------------

LLAMA31_8B = ModelSpec(
    name="Llama-3.1-8B",
    params=8.03e9,  # model card: 8.03B
    layers=32,  # config.json num_hidden_layers
    kv_heads=8,  # num_key_value_heads (GQA)
    head_dim=128,  # hidden 4096 / 32 heads
    q_heads=32,
    dtype_bytes=2,  # bf16
    source="meta-llama/Llama-3.1-8B config.json and model card",
)

QWEN25_32B = ModelSpec(
    name="Qwen2.5-32B",
    # 64 layers x 487.6M (attention 62.9M + MLP 3*5120*27648) + untied embeddings and LM head
    # 2 x 152064*5120 = 32.76e9; the model card rounds the non-embedding part to 31.0B.
    params=32.8e9,
    layers=64,
    kv_heads=8,
    head_dim=128,  # hidden 5120 / 40 heads
    q_heads=40,
    dtype_bytes=2,
    source="Qwen/Qwen2.5-32B config.json (hidden 5120, 40 heads, 8 KV heads, FFN 27648)",
)

H100_SXM = AcceleratorSpec(
    name="H100-80GB-SXM",
    memory_bytes=81559 * 2**20,  # nvidia-smi total: 81559 MiB
    bandwidth_bytes_per_s=3.35e12,  # data sheet: 3.35 TB/s HBM3
    flops_per_s=989e12,  # data sheet: 989 TFLOP/s dense bf16 (1979 with sparsity)
    bandwidth_efficiency=0.8,  # memcpy/GEMV benchmarks reach ~2.6-3.0 TB/s
    decode_flops_efficiency=0.5,  # skinny decode GEMMs run well below peak
    prefill_mfu=0.5,  # long prefills reach ~50-60% MFU in vLLM/SGLang benchmarks
    source="NVIDIA H100 data sheet (SXM5); efficiencies are our estimates",
)

# A toy model on a toy accelerator: steps of a few milliseconds and a KV cache of a few
# sequences, so tests exercise queueing and preemption in microseconds of real time.
TINY_MODEL = ModelSpec(
    name="tiny",
    params=1.0e6,
    layers=2,
    kv_heads=1,
    head_dim=8,
    q_heads=2,
    dtype_bytes=2,
    source="made up for tests",
)
TINY_GPU = AcceleratorSpec(
    name="tiny-gpu",
    memory_bytes=2.0e6 + 64 * 2000,  # weights (2 MB) + room for 2000 tokens of KV (64 B each)
    bandwidth_bytes_per_s=1.0e9,
    flops_per_s=1.0e12,
    source="made up for tests",
)

PRESETS: dict[str, ClusterSpec] = {
    "llama3.1-8b-h100": ClusterSpec(
        name="llama3.1-8b-h100",
        model=LLAMA31_8B,
        accelerator=H100_SXM,
        gpus=8,  # one 8-GPU node
        tp=1,  # 16 GB of weights fit one GPU: 8 independent replicas
        max_num_seqs=96,  # KV-bound at 16k: ~100 sequences of mean context ~4k fit;
        # a larger value only adds preemptions (measured with this simulator)
        gpu_memory_utilization=0.85,  # colocated trainer offloads its state during rollout
        reserve_bytes_per_gpu=3 * GiB,  # vLLM's profiled activation peak + CUDA graphs
        prompt_len=512,
        response_cap=16384,  # the paper's long-trajectory setting
        training_mfu=0.35,  # FSDP RL training with long sequences
        step_overhead_s=1.5e-3,  # vLLM V1 scheduler + sampler per step, CUDA graphs on
        allreduce_latency_s=10e-6,  # NVLink custom all-reduce of one token row
        update_overhead_s=3.0,  # optimizer step + colocated switch (engine sleep/wake, offload)
        sync_bandwidth_bytes_per_s=20e9,  # effective: gather + per-tensor reload, not NVLink peak
        sync_overhead_s=1.0,
        notes="timings are roofline estimates, not measurements",
    ),
    "qwen2.5-32b-h100": ClusterSpec(
        name="qwen2.5-32b-h100",
        model=QWEN25_32B,
        accelerator=H100_SXM,
        gpus=16,  # two 8-GPU nodes
        tp=4,  # 66 GB of weights: 4 GPUs per replica leaves room for KV; 4 replicas
        max_num_seqs=192,  # KV-bound at 16k: ~200 sequences of mean context ~4k fit
        gpu_memory_utilization=0.85,
        reserve_bytes_per_gpu=3 * GiB,
        prompt_len=512,
        response_cap=16384,
        training_mfu=0.35,
        step_overhead_s=1.5e-3,
        allreduce_latency_s=10e-6,
        update_overhead_s=5.0,  # larger optimizer state to move when colocated
        sync_bandwidth_bytes_per_s=20e9,
        sync_overhead_s=1.5,
        notes="timings are roofline estimates, not measurements",
    ),
    "test-tiny": ClusterSpec(
        name="test-tiny",
        model=TINY_MODEL,
        accelerator=TINY_GPU,
        gpus=2,
        tp=1,
        max_num_seqs=8,
        gpu_memory_utilization=1.0,
        reserve_bytes_per_gpu=0.0,
        prompt_len=16,
        response_cap=64,
        training_mfu=0.5,
        step_overhead_s=1e-3,
        allreduce_latency_s=0.0,
        update_overhead_s=0.01,
        sync_bandwidth_bytes_per_s=1e9,
        sync_overhead_s=0.001,
        notes="for tests only",
    ),
}


def get_preset(name: str) -> ClusterSpec:
    """The preset called `name`; an unknown name is a ConfigError listing the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        known = ", ".join(sorted(PRESETS))
        raise ConfigError(f"unknown preset '{name}'; known presets: {known}") from None


def resolve_preset(preset: str | ClusterSpec) -> ClusterSpec:
    return get_preset(preset) if isinstance(preset, str) else preset
