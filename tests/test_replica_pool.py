"""Rollout replicas as Ray actors: the replica pool keeps the engine contract over
2 transformers replicas, steps them concurrently, syncs weights into every replica, scores
rewards in the replicas and survives a replica killed in the middle of rollout."""

from __future__ import annotations

import copy

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("torch")
pytest.importorskip("transformers")

from sortedrl.cluster.config import ClusterConfig  # noqa: E402
from sortedrl.cluster.placement import Placement  # noqa: E402
from sortedrl.cluster.replicas import (  # noqa: E402
    ReplicaPool,
    build_replica_pool,
    replica_spawner,
)
from sortedrl.config import TrainConfig  # noqa: E402
from sortedrl.scheduling.controller import Controller  # noqa: E402
from sortedrl.scheduling.loop import run  # noqa: E402
from sortedrl.scheduling.protocol import Request, UpdateResult  # noqa: E402
from tests.engine_contract import (  # noqa: E402
    EngineContract,
    Harness,
    drain,
    tiny_greedy,
    tiny_harness,
)
from tests.replica_fakes import LateDeliveryReplica, SteppingReplica  # noqa: E402
from tests.stepping_engine import UnitTrainer  # noqa: E402

CLUSTER = ClusterConfig(backend="ray", rollout_replicas=2)


def _greedy_cfg(capacity: int) -> TrainConfig:
    cfg = TrainConfig(cluster=CLUSTER)
    # Greedy, as the contract's engines run; the config itself refuses temperature 0.
    rollout = cfg.rollout.model_copy(update={"capacity": capacity, "temperature": 0.0})
    return cfg.model_copy(update={"rollout": rollout})


@pytest.fixture(scope="module")
def placement(ray_local):
    p = Placement(CLUSTER, "sorted", "cpu")
    p.start()
    yield p
    p.close()


def _without_stop(tok, model):
    """No end-of-sequence token, so the factory's engines have no stop token, as the
    contract's run (`stop_token_ids=[]`): a response ends at its cap or when aborted."""
    tok = copy.deepcopy(tok)
    tok.eos_token = None
    model.config.eos_token_id = None
    return tok, model


@pytest.fixture(scope="module")
def greedy_pool(placement):
    tok, model = _without_stop(*tiny_greedy())
    # The contract steps a couple of times and expects the response still running: the
    # driver hears from a replica every 5 ms (a few decode steps of the tiny model).
    cfg = _greedy_cfg(3)
    cfg = cfg.model_copy(update={"cluster": CLUSTER.model_copy(update={"replica_report_s": 0.005})})
    pool = build_replica_pool(cfg, model, tok, 0, placement, None)
    yield pool, tok, model
    pool.close()


@pytest.fixture
def h(greedy_pool) -> Harness:
    pool, tok, model = greedy_pool
    pool.pause()  # whatever an earlier test left running
    pool.load_weights(model.state_dict(), 0)  # the contract model, as version 0
    return tiny_harness(pool, tok, model)


class TestThePoolKeepsTheEngineContract(EngineContract):
    """The engine contract, against a pool of 2 replicas (the fixture `h` above)."""


def _requests(n: int, max_new: list[int] | int, harness=None) -> list[Request]:
    out = []
    for i in range(n):
        ids = harness.prompt(i) if harness is not None else None
        cap = max_new[i] if isinstance(max_new, list) else max_new
        out.append(Request(f"r{i}", f"p{i}", 0, 0, len(ids) if ids else 4, cap, ids))
    return out


def _fake_pool(delays: list[float], capacity: int = 2, backlog: int = 0) -> ReplicaPool:
    actor = ray.remote(SteppingReplica)
    return ReplicaPool(
        lambda i: actor.options(num_cpus=0).remote(capacity, delays[i]),
        len(delays),
        0,
        backlog=backlog,
    )


def _assert_time_balances(pool: ReplicaPool, reports) -> None:
    for rep in reports:
        assert rep.busy_slot_s <= pool.capacity * rep.elapsed_s * (1 + 1e-9) + 1e-12
    reported = sum(r.busy_slot_s for r in reports)
    replicas = sum(s["busy_slot_s"] for s in pool.stats["replicas"])
    assert reported == pytest.approx(replicas, rel=1e-9)


def test_a_step_returns_while_a_slower_replica_still_steps_and_settle_returns_the_rest(
    ray_local,
):
    pool = _fake_pool([0.0, 2.0])
    try:
        # Routed least-loaded in order: r0, r2 to replica 0 (fast), r1, r3 to replica 1.
        pool.submit(_requests(4, 3))
        reports, fast_done = [], set()
        while {"r0", "r2"} - fast_done:
            reports.append(pool.step())
            fast_done |= {g.request_id for g in reports[-1].finished}
        per = pool.stats["replicas"]
        assert per[0]["steps"] >= 3 and per[1]["steps"] == 0  # replica 1: first step running
        assert fast_done == {"r0", "r2"} and pool.in_flight() == 1
        reports.append(pool.settle())
        assert pool.in_flight() == 0 and pool.stats["replicas"][1]["steps"] == 1
        while pool.num_unfinished():
            reports.append(pool.step())
        back = [g.request_id for r in reports for g in r.finished]
        assert sorted(back) == ["r0", "r1", "r2", "r3"]
        _assert_time_balances(pool, reports)
    finally:
        pool.close()


@pytest.mark.parametrize("call", ["pause", "abort", "load_weights"])
def test_a_call_that_settles_keeps_what_finished_for_the_next_step(ray_local, call):
    pool = _fake_pool([0.5, 2.0])
    try:
        pool.submit(_requests(2, [4, 1]))  # r0 (3 tokens) on the faster replica, r1 (1) on the slow
        first = pool.step()  # a heartbeat (report_s): both replicas are in their first step
        assert not first.finished and pool.in_flight() == 2
        if call == "pause":
            partials = pool.pause()
            assert [g.request_id for g in partials] == ["r0"]
        elif call == "abort":
            partials = pool.abort(["r0"])
            assert [g.request_id for g in partials] == ["r0"]
        else:
            pool.load_weights(None, 1)
        assert pool.in_flight() == 0
        held = pool.step()  # returns at once with what the settle collected
        assert [g.request_id for g in held.finished] == ["r1"]
        assert pool.stats["finished_held_by_calls"] == 1
        assert held.busy_slot_s <= pool.capacity * held.elapsed_s * (1 + 1e-9)
    finally:
        pool.close()


@pytest.mark.parametrize("call", ["pause", "load_weights"])
def test_a_replica_found_dead_by_a_pause_or_a_weight_load_is_restarted(ray_local, call):
    # Steps longer than the pool's report_s: the first step() is a heartbeat, and the settle
    # holds every replica after its first step (replicas run by themselves; at no step time
    # they would finish everything before the driver looks).
    pool = _fake_pool([0.3, 0.3])
    try:
        pool.submit(_requests(4, 6))  # r1, r3 on replica 1
        pool.step()
        pool.settle()  # nothing in flight: the death is found by the call itself
        ray.kill(pool.actors()[1])
        if call == "pause":
            back = pool.pause()
            assert sorted(g.request_id for g in back) == ["r0", "r1", "r2", "r3"]
            assert all(g.finish_reason == "abort" for g in back)
            # The dead replica's requests come back as they were submitted (no tokens yet).
            assert [g.n_tokens for g in back if g.request_id in ("r1", "r3")] == [0, 0]
            pool.submit(_requests(2, 3))
            want = ["r0", "r1"]
        else:
            pool.load_weights(None, 1)
            want = ["r0", "r1", "r2", "r3"]
        gens = []
        while pool.num_unfinished():
            gens += pool.step().finished
        assert sorted(g.request_id for g in gens) == want
        assert pool.stats["replica_restarts"] == 1 and pool.version == (call == "load_weights")
        assert ray.get(pool.actors()[1].version.remote()) == pool.version
    finally:
        pool.close()


def test_a_replica_killed_holding_finished_generations_loses_none_and_counts_none_twice(
    ray_local,
):
    import time

    actor = ray.remote(LateDeliveryReplica)
    pool = ReplicaPool(
        lambda i: actor.options(num_cpus=0, max_concurrency=2).remote(2, 0.01, 60.0 * i), 2, 0
    )
    try:
        pool.submit(_requests(4, 3))  # r1, r3 on replica 1, whose first poll delivers late
        reports = [pool.step()]  # replica 0's delivery
        slow = pool.actors()[1]
        for _ in range(200):  # replica 1 finishes r1 and r3 in ~30 ms and keeps them
            if ray.get(slow.undelivered.remote()) == 2:
                break
            time.sleep(0.05)
        assert ray.get(slow.undelivered.remote()) == 2 and ray.get(slow.num_unfinished.remote())
        ray.kill(slow)
        while pool.num_unfinished():
            reports.append(pool.step())
        back = [g for r in reports for g in r.finished]
        assert sorted(g.request_id for g in back) == ["r0", "r1", "r2", "r3"]  # once each
        # The tokens the killed replica generated were never delivered, so never counted:
        # every token reported belongs to a response delivered once.
        assert sum(r.tokens_generated for r in reports) == sum(g.n_tokens for g in back) == 12
        assert pool.stats["replica_restarts"] == 1
        assert pool.stats["replicas"][1]["requests_resubmitted"] == 2
        _assert_time_balances(pool, reports)
    finally:
        pool.close()


@pytest.mark.parametrize("call", ["pause", "abort"])
def test_backlog_requests_come_back_unstarted_from_a_pause_or_an_abort(ray_local, call):
    pool = _fake_pool([0.3, 0.3], backlog=2)
    try:
        assert pool.submit_ahead == 4 and pool.capacity == 4
        # Each replica takes its 2 slots and 2 more: r0, r2 run on replica 0, r4, r6 wait in
        # its backlog (r1, r3 and r5, r7 on replica 1).
        pool.submit(_requests(8, 6))
        pool.step()  # both replicas ended their first step
        backlog = {"r4", "r5", "r6", "r7"}
        if call == "pause":
            back = pool.pause()
            assert sorted(g.request_id for g in back) == [f"r{i}" for i in range(8)]
            rest: list[str] = []
        else:
            back = pool.abort(["r0", "r5", "r6"])
            assert sorted(g.request_id for g in back) == ["r0", "r5", "r6"]
            rest = ["r1", "r2", "r3", "r4", "r7"]
        assert all(g.finish_reason == "abort" for g in back)
        assert all(g.n_tokens == 0 and not g.version_spans for g in back if g.request_id in backlog)
        assert all(g.n_tokens > 0 for g in back if g.request_id not in backlog)
        assert pool.num_unfinished() == len(rest)
        gens = []
        while pool.num_unfinished():
            gens += pool.step().finished
        assert sorted(g.request_id for g in gens) == rest  # the others finish, once each
        assert all(g.finish_reason != "abort" for g in gens)
    finally:
        pool.close()


def test_a_backlog_is_started_by_the_replica_and_a_kill_brings_every_request_back_once(
    ray_local,
):
    import time

    actor = ray.remote(LateDeliveryReplica)
    pool = ReplicaPool(
        lambda i: actor.options(num_cpus=0, max_concurrency=2).remote(2, 0.01, 60.0 * i),
        2,
        0,
        backlog=2,
    )
    try:
        pool.submit(_requests(8, 3))  # r1, r3, r5, r7 on replica 1, whose first poll is late
        reports = [pool.step()]
        slow = pool.actors()[1]
        for _ in range(200):  # 2 slots, 4 requests: it starts its backlog without the driver
            if ray.get(slow.undelivered.remote()) == 4:
                break
            time.sleep(0.05)
        assert ray.get(slow.undelivered.remote()) == 4
        ray.kill(slow)
        while pool.num_unfinished():
            reports.append(pool.step())
        back = [g for r in reports for g in r.finished]
        assert sorted(g.request_id for g in back) == [f"r{i}" for i in range(8)]  # once each
        assert sum(r.tokens_generated for r in reports) == sum(g.n_tokens for g in back) == 24
        assert pool.stats["replica_restarts"] == 1
        assert pool.stats["replicas"][1]["requests_resubmitted"] == 4
        _assert_time_balances(pool, reports)
    finally:
        pool.close()


def test_requests_beyond_slots_and_backlogs_wait_in_the_pool_for_the_first_room(ray_local):
    pool = _fake_pool([0.0, 0.0], backlog=1)
    try:
        pool.submit(_requests(9, 3))  # 2 x (2 slots + 1 backlog) routed, 3 wait in the pool
        assert [len(r.held) for r in pool._reps] == [3, 3] and len(pool._waiting) == 3
        gens = []
        while pool.num_unfinished():
            gens += pool.step().finished
            assert all(len(r.held) <= 3 for r in pool._reps)
        assert sorted(g.request_id for g in gens) == sorted(f"r{i}" for i in range(9))
    finally:
        pool.close()


@pytest.mark.parametrize("weight_sync", ["object_store", "broadcast"])
def test_weight_sync_loads_the_same_weights_into_every_replica(placement, greedy_pool, weight_sync):
    from sortedrl.engines.transformers_engine import TransformersEngine

    pool, tok, model = greedy_pool
    if weight_sync == "broadcast":  # a second pool, its replicas in a gloo group of their own
        spawn = replica_spawner(_greedy_cfg(3), model, tok, 0, placement, None)
        pool = ReplicaPool(spawn, 2, 0, weight_sync="broadcast")
    try:
        _, new = _without_stop(*tiny_greedy(seed=11))
        pool.pause()
        seconds = pool.load_weights(new.state_dict(), 1)
        assert seconds > 0 and pool.stats["weight_sync_s"][-1] == seconds
        harness = tiny_harness(pool, tok, new)
        reqs = _requests(12, 8, harness)
        pool.submit(reqs)
        gens, _ = drain(pool)
        local = TransformersEngine(copy.deepcopy(new), tok, capacity=6, temperature=0.0)
        local.submit(reqs)
        want, _ = drain(local)
        got = {g.request_id: (g.token_ids, g.version_spans) for g in gens}
        assert got == {g.request_id: (g.token_ids, [(1, g.n_tokens)]) for g in want}
        assert all(s["tokens_generated"] > 0 for s in pool.stats["replicas"])
    finally:
        if weight_sync == "broadcast":
            pool.close()


def test_evaluation_on_the_replicas_is_the_local_one_and_leaves_the_rollout_alone(greedy_pool):
    """`ReplicaPool.evaluate` (the Ray run's evaluation): the replicas' greedy answers are the
    ones a local engine over the same weights gives; the rollout requests they hold, and
    their samplers, are left as they were."""
    import torch

    from sortedrl.engines.transformers_engine import TransformersEngine

    pool, tok, model = greedy_pool
    pool.pause()
    pool.load_weights(model.state_dict(), 0)
    harness = tiny_harness(pool, tok, model)
    rollout = _requests(4, 10, harness)
    pool.submit(rollout)
    pool.step()
    rng = pool.rng_state()
    evals = [
        Request(f"eval/{i}", f"e{i}", 0, 0, len(harness.prompt(i + 4)), 6, harness.prompt(i + 4))
        for i in range(5)
    ]
    got = {g.request_id: g.token_ids for g in pool.evaluate(evals, 0.0, 1.0, 0)}
    local = TransformersEngine(copy.deepcopy(model), tok, capacity=3, temperature=0.0)
    local.submit(evals)
    want, _ = drain(local)
    assert got == {g.request_id: g.token_ids for g in want}
    after = pool.rng_state()
    assert len(after) == len(rng) == 2
    assert all(torch.equal(a, b) for a, b in zip(after, rng, strict=True))  # generator states
    gens, _ = drain(pool)  # the rollout goes on where it was
    assert sorted(g.request_id for g in gens) == sorted(r.request_id for r in rollout)
    assert all(g.n_tokens == 10 for g in gens)


class _WeightsTrainer(UnitTrainer):
    """Returns the model's weights as each update's result (so a restarted replica has real
    weights to load)."""

    def __init__(self, model) -> None:
        super().__init__(0.0)
        self.model = model

    def update(self, batch):
        super().update(batch)
        return UpdateResult(elapsed_s=0.0, weights=self.model.state_dict())


def test_a_replica_killed_mid_rollout_is_restarted_and_every_request_comes_back_once(
    placement,
):
    from sortedrl.commands.prepare import prepare_prompts
    from sortedrl.models.tiny import build_char_tokenizer, build_tiny_model
    from sortedrl.tasks.registry import build_task

    cfg = TrainConfig.model_validate(
        {
            "cluster": CLUSTER.model_dump(),
            "rollout": {"capacity": 4},
            "scheduler": {
                "policy": "sorted",
                "group_size": 2,
                "rollout_batch": 4,
                "update_batch": 2,
                "max_new_tokens": 10,
            },
        }
    )
    task = build_task(cfg.task)
    tok = build_char_tokenizer(task.alphabet)
    model = build_tiny_model(len(tok), seed=0, size="micro")
    prompts = prepare_prompts(task.problems("train", 8, seed=0), [], tok)
    pool = build_replica_pool(cfg, model, tok, 0, placement, prompts.by_id)
    seen: list[str] = []
    steps = [0]

    def kill_once() -> bool:  # called before every engine step
        steps[0] += 1
        if steps[0] == 2:  # after the first step: every replica holds requests
            assert pool.num_unfinished() > 0  # in the middle of rollout
            ray.kill(pool.actors()[0])
        return False

    def scorer(gens, keys):
        assert all(g.score is not None for g in gens)  # scored in the replica
        seen.extend(g.request_id for g in gens)
        return [g.score.reward for g in gens], 0.0

    try:
        ctl = Controller(cfg.scheduler, prompts.specs)
        res = run(ctl, pool, _WeightsTrainer(model), scorer=scorer, should_stop=kill_once)
        s = res.summary
        assert pool.stats["replica_restarts"] == 1
        killed = pool.stats["replicas"][0]
        assert killed["restarts"] == 1 and killed["requests_resubmitted"] > 0
        assert all(r["reward_s"] > 0 for r in pool.stats["replicas"])
        assert len(seen) == len(set(seen))  # no request came back twice
        assert s["prompts_trained"] + s["prompts_dropped"] == 8 and s["prompts_in_flight"] == 0
        assert s["tokens_generated"] == s["tokens_trained"] + s["tokens_wasted"]
        assert s["engine_restarts"] == 0  # the loop never saw it
        # The loop settles before it pauses or loads weights: those calls found nothing running.
        assert pool.stats["finished_held_by_calls"] == 0
    finally:
        pool.close()
