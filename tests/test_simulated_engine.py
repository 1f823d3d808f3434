"""The simulated engine against the engine contract, and its cost-model trainer."""

from __future__ import annotations

import dataclasses
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sortedrl.engines.costmodel import CostModel, get_preset
from sortedrl.engines.simulated import SimulatedEngine
from sortedrl.engines.simulated_trainer import CostModelTrainer
from sortedrl.errors import ConfigError
from sortedrl.scheduling.protocol import (
    Engine,
    Generation,
    Partial,
    Request,
    StepReport,
    Trainer,
    TrainGroup,
    TrainSample,
    UpdateBatch,
)
from sortedrl.workload import Workload, default_lengths_spec

TINY = get_preset("test-tiny")
# 200 KV tokens per replica: 8 running sequences of up to 80 tokens must preempt.
SMALL_KV = dataclasses.replace(
    TINY,
    name="tiny-small-kv",
    accelerator=dataclasses.replace(TINY.accelerator, memory_bytes=2.0e6 + 64 * 200),
)
LENGTHS = "lognormal:median=20,sigma=0.9"  # some hit the cap of 64


def make(spec=TINY, prompts=30, group=4, lengths=LENGTHS, seed=0, **kw):
    w = Workload.from_spec(
        lengths, spec.response_cap, group, [f"p{i}" for i in range(prompts)], seed=seed
    )
    return SimulatedEngine(spec, w, **kw), w


class Driver:
    """A minimal controller: submits, steps, aborts and resumes, and checks every report."""

    def __init__(self, engine: SimulatedEngine, w: Workload):
        self.e, self.w = engine, w
        self.live: dict[str, Request] = {}  # submitted, not returned
        self.done: dict[tuple[str, int], Generation] = {}  # final generation per sample
        self.returned: set[str] = set()
        self.elapsed = self.busy = 0.0
        self.tokens = self.prefill = 0
        self.new_tokens = 0  # from returned generations: n_tokens minus resumed prefix
        self.next_id = 0

    def request(self, pid: str, idx: int, resume: Partial | None = None, **kw) -> Request:
        self.next_id += 1
        spec = self.e.spec
        return Request(
            request_id=f"r{self.next_id}",
            prompt_id=pid,
            sample_index=idx,
            attempt=kw.pop("attempt", 0),
            prompt_len=kw.pop("prompt_len", spec.prompt_len),
            max_new_tokens=kw.pop("max_new_tokens", spec.response_cap),
            resume=resume,
        )

    def submit(self, reqs: list[Request]) -> None:
        for r in reqs:
            self.live[r.request_id] = r
        self.e.submit(reqs)

    def submit_all(self, prompts: int, group: int) -> None:
        self.submit([self.request(f"p{p}", i) for p in range(prompts) for i in range(group)])

    def take(self, gens: list[Generation], resume: bool) -> None:
        for g in gens:
            assert g.request_id not in self.returned, "returned twice"
            self.returned.add(g.request_id)
            req = self.live.pop(g.request_id)
            prefix = req.resume.n_tokens if req.resume else 0
            self.new_tokens += g.n_tokens - prefix
            assert sum(n for _, n in g.version_spans) == g.n_tokens
            versions = [v for v, _ in g.version_spans]
            assert versions == sorted(versions) and all(n > 0 for _, n in g.version_spans)
            if g.finish_reason == "abort":
                assert g.n_tokens >= prefix
                if resume:
                    self.submit(
                        [
                            self.request(
                                req.prompt_id,
                                req.sample_index,
                                g.as_partial(),
                                attempt=req.attempt,
                                prompt_len=req.prompt_len,
                                max_new_tokens=req.max_new_tokens,
                            )
                        ]
                    )
            else:
                key = (req.prompt_id, req.sample_index)
                assert key not in self.done
                self.done[key] = g
                exp_n, exp_reason = expected(self.e, self.w, req)
                assert (g.n_tokens, g.finish_reason) == (exp_n, exp_reason)

    def step(self) -> StepReport:
        rep = self.e.step()
        assert rep.elapsed_s >= 0 and rep.busy_slot_s >= 0
        assert rep.busy_slot_s <= self.e.capacity * rep.elapsed_s * (1 + 1e-9) + 1e-12
        self.elapsed += rep.elapsed_s
        self.busy += rep.busy_slot_s
        self.tokens += rep.tokens_generated
        self.prefill += rep.prefill_tokens
        self.take(rep.finished, resume=True)
        check_internal(self.e)
        return rep

    def drain(self, limit: int = 200_000) -> None:
        for _ in range(limit):
            if not self.e.num_unfinished():
                break
            self.step()
        assert self.e.num_unfinished() == 0 and not self.live


def expected(e: SimulatedEngine, w: Workload, req: Request) -> tuple[int, str]:
    natural = w.length(req.prompt_id, req.sample_index, req.attempt)
    cap = min(req.max_new_tokens, e.spec.response_cap, w.cap)
    return min(natural, cap), ("length" if natural >= cap else "stop")


def check_internal(e: SimulatedEngine) -> None:
    """Capacity limits hold at every replica boundary."""
    assert 0 <= e.num_running <= e.capacity
    assert e.num_running == sum(r.n for r in e.replicas)
    if e.num_waiting:  # work conserving: a queued request never waits beside an idle replica
        assert all(r.n > 0 for r in e.replicas)
    for r in e.replicas:
        assert 0 <= r.n <= e.spec.max_num_seqs
        assert r.kv <= e.cost.kv_capacity_tokens


# --- contract -----------------------------------------------------------------------------------


def test_implements_the_protocols():
    e, _ = make()
    assert isinstance(e, Engine)
    assert isinstance(CostModelTrainer("test-tiny"), Trainer)
    assert e.capacity == 16 and e.version == 0 and e.num_unfinished() == 0
    empty = e.step()
    assert empty.finished == [] and empty.elapsed_s == 0


def test_every_request_returns_once_with_its_length():
    e, w = make(prompts=40)
    d = Driver(e, w)
    d.submit_all(40, 4)
    assert e.num_unfinished() == 160
    d.drain()
    assert len(d.done) == 160
    assert d.tokens == d.new_tokens == sum(g.n_tokens for g in d.done.values())
    assert d.prefill == 160 * TINY.prompt_len  # no preemption with the roomy KV cache
    assert all(g.version_spans == [(0, g.n_tokens)] for g in d.done.values())
    reasons = {g.finish_reason for g in d.done.values()}
    assert reasons == {"stop", "length"}  # the spec reaches the cap of 64 sometimes
    assert 0 < d.busy <= e.capacity * d.elapsed
    assert e.now == pytest.approx(d.elapsed)


def test_one_request_takes_prefill_plus_decode_steps():
    e, w = make(lengths="fixed:length=50")
    d = Driver(e, w)
    d.submit([d.request("p0", 0)])
    d.drain()
    cm = e.cost
    p = TINY.prompt_len
    assert d.elapsed == pytest.approx(cm.prefill_time(p) + cm.decode_steps_time(1, p, 50))
    assert d.busy == pytest.approx(d.elapsed)  # one sequence all the time


def test_least_loaded_replica_and_independent_clocks():
    e, w = make(lengths="fixed:length=30")
    d = Driver(e, w)
    d.submit([d.request("p0", 0), d.request("p0", 1)])
    assert [r.n for r in e.replicas] == [1, 1]
    rep = d.step()  # both finish at the same moment on their own replicas
    assert len(rep.finished) == 2
    d.drain()
    # Three sequences: two on one replica, one on the other; the lone one finishes first.
    e2, w2 = make(lengths="fixed:length=30")
    d2 = Driver(e2, w2)
    d2.submit([d2.request("p0", i) for i in range(3)])
    assert sorted(r.n for r in e2.replicas) == [1, 2]
    first = d2.step()
    assert len(first.finished) == 1
    second = d2.step()
    assert len(second.finished) == 2 and second.elapsed_s > 0
    d2.drain()


def test_queue_is_fifo_and_capacity_bounded():
    e, w = make(prompts=12, lengths="fixed:length=30")
    d = Driver(e, w)
    reqs = [d.request(f"p{p}", i) for p in range(12) for i in range(4)]
    d.submit(reqs)
    assert e.num_running == e.capacity and e.num_unfinished() == 48
    waves = []
    while e.num_unfinished():
        rep = d.step()
        if rep.finished:
            waves.append({g.request_id for g in rep.finished})
    # Equal lengths: requests run in waves of `capacity`, in submission order.
    ids = [r.request_id for r in reqs]
    assert waves == [set(ids[0:16]), set(ids[16:32]), set(ids[32:48])]


def test_max_new_tokens_cuts_with_length():
    e, w = make(lengths="fixed:length=50")
    d = Driver(e, w)
    d.submit([d.request("p0", 0, max_new_tokens=10), d.request("p0", 1, max_new_tokens=50)])
    d.drain()
    assert d.done[("p0", 0)].finish_reason == "length" and d.done[("p0", 0)].n_tokens == 10
    assert d.done[("p0", 1)].finish_reason == "length"  # reached max_new_tokens exactly


def test_preemption_under_a_tiny_kv_cache_still_completes():
    e, w = make(spec=SMALL_KV, prompts=30, lengths="uniform:min=30,max=64")
    assert e.cost.kv_capacity_tokens == 200
    d = Driver(e, w)
    d.submit_all(30, 4)
    d.drain()
    assert len(d.done) == 120
    assert e.preemptions > 0
    # Preempted sequences are prefilled again with their progress.
    assert d.prefill > 120 * SMALL_KV.prompt_len
    assert d.tokens == sum(g.n_tokens for g in d.done.values())


def test_abort_returns_partials_that_resume_to_the_same_length():
    e, w = make(spec=SMALL_KV, prompts=20)
    d = Driver(e, w)
    d.submit_all(20, 4)
    for _ in range(15):
        d.step()
    running = e.request_ids("running")[:5]
    waiting = e.request_ids("waiting")[:3]
    gens = e.abort(running + waiting + ["no-such-id"])
    assert {g.request_id for g in gens} == set(running + waiting)
    assert all(g.finish_reason == "abort" for g in gens)
    assert any(g.n_tokens > 0 for g in gens)
    d.take(gens, resume=True)
    assert e.abort(running) == []  # already returned
    d.drain()
    assert len(d.done) == 80
    assert d.tokens == d.new_tokens


def test_pause_returns_every_unfinished_request():
    e, w = make(spec=SMALL_KV, prompts=20)
    d = Driver(e, w)
    d.submit_all(20, 4)
    for _ in range(10):
        d.step()
    before = e.num_unfinished()
    gens = e.pause()
    assert len(gens) == before and e.num_unfinished() == 0
    assert all(g.finish_reason == "abort" for g in gens)
    assert e.step().elapsed_s == 0  # nothing left to run
    d.take(gens, resume=True)
    d.drain()
    assert len(d.done) == 80 and d.tokens == d.new_tokens


def test_load_weights_versions_later_tokens():
    e, w = make(prompts=8, lengths="fixed:length=60", max_event_steps=20)
    d = Driver(e, w)
    d.submit_all(8, 4)  # 32 requests, 16 run at once
    d.step()  # 20 decode steps on both replicas
    assert not d.done
    sync = e.load_weights(None, 1)
    assert sync == pytest.approx(e.cost.weight_sync_time()) and e.version == 1
    d.drain()
    spans = sorted(tuple(g.version_spans) for g in d.done.values())
    # The first wave straddles the update; the second wave ran entirely under version 1.
    assert spans == [((0, 20), (1, 40))] * 16 + [((1, 60),)] * 16


def test_versions_survive_abort_and_resume():
    e, w = make(prompts=2, lengths="fixed:length=60", max_event_steps=10)
    d = Driver(e, w)
    d.submit([d.request("p0", 0)])
    d.step()
    part = e.abort(["r1"])
    assert part[0].n_tokens == 10 and part[0].version_spans == [(0, 10)]
    d.take(part, resume=False)
    e.load_weights(None, 3)
    d.submit([d.request("p0", 0, part[0].as_partial())])
    d.drain()
    assert d.done[("p0", 0)].version_spans == [(0, 10), (3, 50)]
    assert d.prefill == 2 * TINY.prompt_len + 10  # the resumed prefix is prefilled again


def test_abort_finishes_the_step_in_progress_and_pause_drops_it():
    for how, expect in [("abort", 15), ("pause", 14)]:
        e, w = make(lengths="fixed:length=60")
        d = Driver(e, w)
        # Replica 0 runs two sequences (slightly slower steps), replica 1 one that stops at 15.
        d.submit([d.request("p0", 0), d.request("p0", 1, max_new_tokens=15)])
        d.submit([d.request("p0", 2)])
        assert [r.n for r in e.replicas] == [2, 1]
        rep = d.step()
        assert [g.n_tokens for g in rep.finished] == [15]
        assert e.replicas[0].t < e.now  # replica 0 is in the middle of its 15th step
        gens = e.abort(["r1"]) if how == "abort" else e.pause()
        assert {g.n_tokens for g in gens} == {expect}, how
        d.take(gens, resume=True)
        d.drain()
        assert d.tokens == d.new_tokens


def test_update_then_pause_in_mid_step_versions_the_resumed_tokens():
    e, w = make(lengths="fixed:length=60")
    d = Driver(e, w)
    d.submit([d.request("p0", 0), d.request("p0", 1, max_new_tokens=15)])
    d.submit([d.request("p0", 2)])
    d.step()  # replica 0 is in the middle of its 15th step
    e.load_weights(None, 1)  # due at the end of that step...
    gens = e.pause()  # ...which the pause drops
    assert {g.n_tokens for g in gens} == {14}
    d.take(gens, resume=True)
    d.drain()
    assert d.done[("p0", 0)].version_spans == [(0, 14), (1, 46)]


def test_resume_with_nothing_left_finishes_at_once():
    e, w = make(lengths="fixed:length=10")
    d = Driver(e, w)
    d.submit([d.request("p0", 0, Partial(10, [(2, 10)]))])
    assert e.num_unfinished() == 1
    rep = d.step()
    assert rep.finished[0].n_tokens == 10 and rep.tokens_generated == 0
    assert rep.finished[0].version_spans == [(2, 10)]


def test_submit_errors():
    e, w = make()
    r = Request("x", "p0", 0, 0, 16, 64)
    e.submit([r])
    with pytest.raises(ValueError, match="already in the engine"):
        e.submit([r])
    with pytest.raises(ConfigError, match="exceeds the KV cache"):
        e.submit([Request("y", "p0", 1, 0, 5000, 64)])
    with pytest.raises(ConfigError, match="unknown preset"):
        SimulatedEngine("nope", e.workload)


def test_gpu_override_for_async_splits():
    llama = get_preset("llama3.1-8b-h100")
    w = Workload.from_spec(default_lengths_spec(llama.response_cap), llama.response_cap, 8)
    assert SimulatedEngine(llama, w, gpus=4).capacity == 4 * llama.max_num_seqs
    full = SimulatedEngine(llama, w).capacity
    assert full == 8 * llama.max_num_seqs


def _scenario(seed: int, gpus: int = 2) -> list[tuple]:
    """A random mix of operations; returns everything observable."""
    rng = random.Random(seed)
    e, w = make(spec=SMALL_KV, prompts=25, seed=seed, gpus=gpus)
    d = Driver(e, w)
    out: list[tuple] = []
    pending = [(f"p{p}", i) for p in range(25) for i in range(4)]
    version = 0
    while pending or e.num_unfinished():
        op = rng.random()
        if pending and op < 0.25:
            batch, pending = pending[:7], pending[7:]
            d.submit([d.request(p, i) for p, i in batch])
        elif op < 0.30 and e.request_ids():
            ids = rng.sample(sorted(e.request_ids()), min(3, len(e.request_ids())))
            gens = e.abort(ids)
            out.append(("abort", [(g.request_id, g.n_tokens) for g in gens]))
            d.take(gens, resume=True)
        elif op < 0.32:
            gens = e.pause()
            out.append(("pause", [(g.request_id, g.n_tokens) for g in gens]))
            d.take(gens, resume=True)
        elif op < 0.36:
            version += 1
            out.append(("load", e.load_weights(None, version)))
        else:
            rep = d.step()
            fin = [(g.request_id, g.n_tokens, tuple(g.version_spans)) for g in rep.finished]
            out.append(("step", fin, rep.elapsed_s, rep.busy_slot_s, rep.tokens_generated))
    d.drain()
    assert len(d.done) == 100
    assert d.tokens == d.new_tokens
    out.append(("totals", d.elapsed, d.busy, d.tokens, d.prefill, e.preemptions))
    return out


def test_same_inputs_give_identical_outputs():
    assert _scenario(7) == _scenario(7)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), gpus=st.sampled_from([1, 2, 5]))
def test_random_operations_keep_the_contract(seed: int, gpus: int):
    _scenario(seed, gpus)


# --- trainer ------------------------------------------------------------------------------------


def _batch(n_groups: int, n_tokens: int, prompt_len: int = 512) -> UpdateBatch:
    groups = [
        TrainGroup(
            f"p{i}",
            prompt_len,
            [TrainSample(j, n_tokens, "stop", [(0, n_tokens)]) for j in range(8)],
        )
        for i in range(n_groups)
    ]
    return UpdateBatch(version=4, groups=groups)


def test_cost_model_trainer_times_updates():
    spec = get_preset("llama3.1-8b-h100")
    cm = CostModel(spec)
    t = CostModelTrainer(spec)
    assert t.virtual_time is True
    res = t.update(_batch(64, 3000))
    seq = 512 + 3000
    assert res.elapsed_s == pytest.approx(cm.update_time(64 * 8 * seq, 64 * 8 * seq * seq))
    assert res.weights == 5 and res.stats["samples"] == 512 and not res.skipped
    # Half the GPUs (an async split): slower; more tokens: slower.
    assert CostModelTrainer(spec, gpu_fraction=0.5).update(_batch(64, 3000)).elapsed_s > (
        res.elapsed_s
    )
    assert t.update(_batch(64, 6000)).elapsed_s > res.elapsed_s
    with pytest.raises(ConfigError):
        CostModelTrainer(spec, gpus=4, gpu_fraction=0.5)
    with pytest.raises(ConfigError):
        CostModelTrainer(spec, gpu_fraction=0)


# --- scale --------------------------------------------------------------------------------------


def test_paper_scale_simulation_is_sane():
    # How fast it runs is measured by benchmarks/bench_simulator.py, not asserted here.
    spec = get_preset("llama3.1-8b-h100")
    prompts, group = 2500, 8
    w = Workload.from_spec(
        default_lengths_spec(spec.response_cap),
        spec.response_cap,
        group,
        (f"p{i}" for i in range(prompts)),
    )
    e = SimulatedEngine(spec, w)
    total = prompts * group
    nxt = 0

    def more(k: int) -> list[Request]:
        nonlocal nxt
        out = []
        for _ in range(min(k, total - nxt)):
            out.append(
                Request(f"r{nxt}", f"p{nxt // group}", nxt % group, 0, 512, spec.response_cap)
            )
            nxt += 1
        return out

    e.submit(more(2 * e.capacity))
    busy = elapsed = 0.0
    finished = tokens = 0
    while e.num_unfinished():
        rep = e.step()
        busy += rep.busy_slot_s
        elapsed += rep.elapsed_s
        tokens += rep.tokens_generated
        finished += len(rep.finished)
        if rep.finished:
            e.submit(more(len(rep.finished)))
    assert finished == total
    # Thousands of tokens per second per GPU, mostly busy slots until the final tail.
    assert 1000 < tokens / elapsed / spec.gpus < 10000
    assert 0.5 < busy / (e.capacity * elapsed) <= 1
