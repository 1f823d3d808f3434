"""TransformersEngine: continuous batching on the tiny model, against the Engine protocol."""

from __future__ import annotations

import random

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from sortedrl.engines.transformers_engine import TransformersEngine  # noqa: E402
from sortedrl.models.tiny import build_char_tokenizer, build_tiny_model  # noqa: E402
from sortedrl.scheduling.protocol import Engine, Generation, Partial, Request  # noqa: E402

ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz +-*=:?\n.,"
LOGPROB_TOL = 1e-4  # fp32, engine vs a plain forward pass


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # On a small shared CPU, torch's default intra-op threads spin against other processes and
    # run this tiny model 10-100x slower than one thread does.
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer(ALPHABET)


@pytest.fixture(scope="module")
def model(tok):
    return build_tiny_model(len(tok), seed=0, size="micro")


@pytest.fixture(scope="module")
def peaked_model(tok):
    """A model with sharp next-token distributions, so greedy decoding has no near-ties."""
    m = build_tiny_model(len(tok), seed=1, size="micro")
    with torch.no_grad():
        m.lm_head.weight.mul_(40.0)
    return m


def make_requests(n, seed=0, min_new=1, max_new=30, min_prompt=2, max_prompt=25, prefix="r"):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        plen = rng.randint(min_prompt, max_prompt)
        prompt = [1] + [rng.randrange(4, len(ALPHABET) + 4) for _ in range(plen - 1)]
        out.append(
            Request(
                request_id=f"{prefix}{i}",
                prompt_id=f"p{i}",
                sample_index=0,
                attempt=0,
                prompt_len=plen,
                max_new_tokens=rng.randint(min_new, max_new),
                prompt_token_ids=prompt,
            )
        )
    return out


def run_all(engine, requests=(), check=None, max_steps=10_000):
    """Step until nothing is unfinished; returns {request_id: Generation} and the reports."""
    engine.submit(list(requests))
    done: dict[str, Generation] = {}
    reports = []
    for _ in range(max_steps):
        if not engine.num_unfinished():
            break
        rep = engine.step()
        reports.append(rep)
        assert engine.num_running() <= engine.capacity
        if check:
            check(engine, rep)
        for g in rep.finished:
            assert g.request_id not in done, "a request came back twice"
            done[g.request_id] = g
    assert engine.num_unfinished() == 0
    return done, reports


def forward_logprobs(model, prompt, response, temperature=1.0):
    ids = torch.tensor([list(prompt) + list(response)])
    with torch.no_grad():
        logits = model(ids).logits[0].float() / temperature
    lp = torch.log_softmax(logits, dim=-1)[len(prompt) - 1 : -1]
    return lp.gather(-1, torch.tensor(response)[:, None]).squeeze(-1)


def spans_total(g):
    return sum(n for _, n in g.version_spans)


def test_implements_protocol(model, tok):
    eng = TransformersEngine(model, tok, capacity=2)
    assert isinstance(eng, Engine)
    assert eng.capacity == 2 and eng.version == 0 and eng.num_unfinished() == 0
    assert eng.step().finished == []  # idle step is harmless


def test_every_request_back_once_and_lengths(model, tok):
    reqs = make_requests(24, seed=1)
    eng = TransformersEngine(model, tok, capacity=5, stop_token_ids=[], seed=0)
    peak = []
    done, reports = run_all(eng, reqs, check=lambda e, r: peak.append(e.num_running()))
    assert set(done) == {r.request_id for r in reqs}
    assert max(peak) == 5
    for r in reqs:
        g = done[r.request_id]
        assert g.finish_reason == "length" and g.n_tokens == r.max_new_tokens
        assert len(g.token_ids) == len(g.logprobs) == g.n_tokens == spans_total(g)
        assert g.version_spans == [(0, g.n_tokens)]
    assert sum(rep.tokens_generated for rep in reports) == sum(r.max_new_tokens for r in reqs)
    assert sum(rep.prefill_tokens for rep in reports) == sum(r.prompt_len for r in reqs)
    for rep in reports:
        assert rep.elapsed_s > 0
        assert 0 <= rep.busy_slot_s <= eng.capacity * rep.elapsed_s + 1e-12


def test_stop_tokens(model, tok):
    stops = {5, 9, 17, 30}
    reqs = make_requests(20, seed=2, min_new=20, max_new=40)
    eng = TransformersEngine(model, tok, capacity=6, stop_token_ids=stops, seed=1)
    done, _ = run_all(eng, reqs)
    reasons = {g.finish_reason for g in done.values()}
    assert reasons == {"stop", "length"}
    for r in reqs:
        g = done[r.request_id]
        assert g.n_tokens <= r.max_new_tokens
        assert not stops & set(g.token_ids[:-1])
        if g.finish_reason == "stop":
            assert g.token_ids[-1] in stops
        else:
            assert g.n_tokens == r.max_new_tokens and g.token_ids[-1] not in stops


def test_default_stop_is_eos(model, tok):
    eng = TransformersEngine(model, tok, capacity=2)
    assert eng.stop_token_ids == {tok.eos_token_id}


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_match_forward_pass(model, tok, temperature):
    # Small capacity and mixed prompt lengths: newcomers join mid-batch, rows shift and compact.
    reqs = make_requests(10, seed=3, min_new=5, max_new=45, max_prompt=40)
    eng = TransformersEngine(model, tok, capacity=3, temperature=temperature, stop_token_ids=[])
    done, _ = run_all(eng, reqs)
    worst = 0.0
    for r in reqs:
        g = done[r.request_id]
        ref = forward_logprobs(model, r.prompt_token_ids, g.token_ids, temperature)
        worst = max(worst, (ref - torch.tensor(g.logprobs)).abs().max().item())
    assert worst < LOGPROB_TOL


def test_kv_buffer_growth(model, tok, monkeypatch):
    import sortedrl.engines.transformers_engine as te

    monkeypatch.setattr(te, "INITIAL_COLUMNS", 4)
    reqs = make_requests(6, seed=14, min_new=40, max_new=90, max_prompt=6)
    eng = TransformersEngine(model, tok, capacity=2, stop_token_ids=[])
    done, _ = run_all(eng, reqs)
    assert eng.stats["compactions"] > 0 and eng._kv.columns > 2 * 6  # grew
    for r in reqs:
        g = done[r.request_id]
        ref = forward_logprobs(model, r.prompt_token_ids, g.token_ids)
        assert (ref - torch.tensor(g.logprobs)).abs().max().item() < LOGPROB_TOL


def test_same_seed_same_output(model, tok):
    reqs = make_requests(8, seed=4)
    a, _ = run_all(TransformersEngine(model, tok, capacity=3, seed=7), reqs)
    b, _ = run_all(TransformersEngine(model, tok, capacity=3, seed=7), reqs)
    c, _ = run_all(TransformersEngine(model, tok, capacity=3, seed=8), reqs)
    assert {k: g.token_ids for k, g in a.items()} == {k: g.token_ids for k, g in b.items()}
    assert {k: g.token_ids for k, g in a.items()} != {k: g.token_ids for k, g in c.items()}


def test_tiny_top_p_is_greedy(peaked_model, tok):
    reqs = make_requests(6, seed=5)
    greedy, _ = run_all(TransformersEngine(peaked_model, tok, capacity=3, temperature=0.0), reqs)
    nucleus, _ = run_all(TransformersEngine(peaked_model, tok, capacity=3, top_p=1e-6), reqs)
    for k, g in greedy.items():
        assert g.token_ids == nucleus[k].token_ids


def test_abort_running_and_queued(model, tok):
    reqs = make_requests(6, seed=6, min_new=20, max_new=30)
    eng = TransformersEngine(model, tok, capacity=2, stop_token_ids=[])
    eng.submit(reqs)
    for _ in range(4):
        assert not eng.step().finished
    running, queued = reqs[1].request_id, reqs[-1].request_id
    out = eng.abort([running, queued, "no-such-id"])
    assert {g.request_id for g in out} == {running, queued}
    by_id = {g.request_id: g for g in out}
    assert all(g.finish_reason == "abort" for g in out)
    aborted = by_id[running]
    assert aborted.n_tokens == 5 == len(aborted.token_ids) == spans_total(aborted)
    assert by_id[queued].n_tokens == 0 and by_id[queued].token_ids == []
    assert eng.num_unfinished() == 4
    assert eng.abort([running]) == []  # already returned
    done, _ = run_all(eng)
    assert set(done) == {r.request_id for r in reqs} - {running, queued}


def test_pause_then_resume_equals_uninterrupted(peaked_model, tok):
    reqs = make_requests(7, seed=7, min_new=10, max_new=40)
    whole, _ = run_all(TransformersEngine(peaked_model, tok, capacity=3, temperature=0.0), reqs)

    eng = TransformersEngine(peaked_model, tok, capacity=3, temperature=0.0)
    eng.submit(reqs)
    first: dict[str, Generation] = {}
    for _ in range(12):
        for g in eng.step().finished:
            first[g.request_id] = g
    partials = eng.pause()
    assert eng.num_unfinished() == 0 and eng.num_running() == 0
    assert {g.request_id for g in partials} | set(first) == {r.request_id for r in reqs}
    assert any(g.n_tokens > 0 for g in partials) and any(g.n_tokens == 0 for g in partials)
    by_id = {r.request_id: r for r in reqs}
    resumed = []
    for g in partials:
        assert g.finish_reason == "abort"
        r = by_id[g.request_id]
        resumed.append(
            Request(
                request_id=r.request_id + "-resumed",
                prompt_id=r.prompt_id,
                sample_index=0,
                attempt=0,
                prompt_len=r.prompt_len,
                max_new_tokens=r.max_new_tokens,
                prompt_token_ids=r.prompt_token_ids,
                resume=g.as_partial(),
            )
        )
    rest, reports = run_all(eng, resumed)
    assert sum(rep.prefill_tokens for rep in reports) == sum(
        r.prompt_len + r.resume.n_tokens for r in resumed
    )
    for g in partials:
        after = rest[g.request_id + "-resumed"]
        assert after.token_ids[: g.n_tokens] == g.token_ids
        assert after.logprobs[: g.n_tokens] == g.logprobs
        first[g.request_id] = after
    for r in reqs:
        a, b = whole[r.request_id], first[r.request_id]
        assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs, strict=True)) < LOGPROB_TOL


def test_resume_keeps_prefix_and_caps_whole_response(model, tok):
    (req,) = make_requests(1, seed=8)
    partial = Partial(n_tokens=5, version_spans=[(0, 2), (1, 3)], token_ids=[7, 8, 9, 10, 11])
    partial.logprobs = [-1.0, -2.0, -3.0, -4.0, -5.0]
    req.max_new_tokens, req.resume = 9, partial
    eng = TransformersEngine(model, tok, capacity=2, stop_token_ids=[])
    eng.load_weights(None, 3)
    done, reports = run_all(eng, [req])
    g = done[req.request_id]
    assert g.n_tokens == 9 and g.finish_reason == "length"
    assert g.token_ids[:5] == partial.token_ids and g.logprobs[:5] == partial.logprobs
    assert g.version_spans == [(0, 2), (1, 3), (3, 4)]
    assert sum(r.tokens_generated for r in reports) == 4
    ref = forward_logprobs(model, req.prompt_token_ids, g.token_ids)[5:]
    assert (ref - torch.tensor(g.logprobs[5:])).abs().max().item() < LOGPROB_TOL


def test_resume_already_complete(model, tok):
    reqs = make_requests(2, seed=9)
    reqs[0].max_new_tokens = 3
    reqs[0].resume = Partial(3, [(0, 3)], [5, 6, 7], [-1.0, -1.0, -1.0])
    reqs[1].resume = Partial(2, [(0, 2)], [5, 2], [-1.0, -1.0])  # ends with eos
    eng = TransformersEngine(model, tok, capacity=2)
    done, reports = run_all(eng, reqs)
    assert done["r0"].finish_reason == "length" and done["r0"].token_ids == [5, 6, 7]
    assert done["r1"].finish_reason == "stop" and done["r1"].n_tokens == 2
    assert sum(r.prefill_tokens for r in reports) == 0


@pytest.mark.parametrize("reprefill", [False, True])
def test_load_weights_changes_versions_and_outputs(tok, reprefill):
    other = build_tiny_model(len(tok), seed=11, size="micro")
    engine_model = build_tiny_model(len(tok), seed=0, size="micro")
    reqs = make_requests(4, seed=10, min_new=30, max_new=30)
    eng = TransformersEngine(
        engine_model, tok, capacity=2, stop_token_ids=[], reprefill_on_load=reprefill
    )
    eng.submit(reqs)
    for _ in range(10):
        eng.step()
    secs = eng.load_weights(other.state_dict(), version=1)
    assert secs >= 0 and eng.version == 1
    for a, b in zip(engine_model.parameters(), other.parameters(), strict=True):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()
    done, reports = run_all(eng)
    # The first step prefills and decodes: 11 tokens by the old weights.
    for rid in ("r0", "r1"):
        assert done[rid].version_spans == [(0, 11), (1, 19)]
    for rid in ("r2", "r3"):  # started after the switch
        assert done[rid].version_spans == [(1, 30)]
    for r in reqs:
        g = done[r.request_id]
        lp = forward_logprobs(other, r.prompt_token_ids, g.token_ids)
        new = slice(11, None) if r.request_id in ("r0", "r1") else slice(None)
        diff = (lp[new] - torch.tensor(g.logprobs[new])).abs().max().item()
        if reprefill or r.request_id in ("r2", "r3"):
            assert diff < LOGPROB_TOL
        else:  # decoded on the cache the old weights computed
            assert diff > LOGPROB_TOL
    # After the switch: the newcomers' prompts, and with reprefill the running ones again.
    expected = sum(r.prompt_len for r in reqs[2:])
    if reprefill:
        expected += sum(r.prompt_len + 11 for r in reqs[:2])
    assert sum(r.prefill_tokens for r in reports) == expected
    with pytest.raises(ValueError, match="state dict"):
        eng.load_weights({"nope": torch.zeros(1)}, 2)


def test_bad_requests(model, tok):
    eng = TransformersEngine(model, tok, capacity=2)
    (req,) = make_requests(1)
    eng.submit([req])
    with pytest.raises(ValueError, match="already"):
        eng.submit([req])
    bad = make_requests(1, prefix="b")[0]
    bad.prompt_token_ids = None
    with pytest.raises(ValueError, match="prompt_token_ids"):
        eng.submit([bad])
    bad = make_requests(1, prefix="c")[0]
    bad.resume = Partial(2, [(0, 2)], [5, 6], None)
    with pytest.raises(ValueError, match="logprobs"):
        eng.submit([bad])
    with pytest.raises(ValueError):
        TransformersEngine(model, tok, capacity=0)


@pytest.mark.parametrize("seed", [12, 13])
def test_random_interleaving_keeps_every_request_and_exact_logprobs(model, tok, seed):
    """Submit, step, abort, pause and resume at random; nothing is lost or duplicated, and
    every response (resumed ones included) scores exactly as a plain forward pass."""
    rng = random.Random(seed)
    eng = TransformersEngine(model, tok, capacity=4, stop_token_ids={7, 8}, seed=seed)
    pool = make_requests(30, seed=seed, max_new=40, max_prompt=35)
    by_id = {r.request_id: r for r in pool}
    final: dict[str, Generation] = {}
    outstanding: set[str] = set()
    resumes = 0

    def resubmit(gens):
        nonlocal resumes
        new = []
        for g in gens:
            outstanding.discard(g.request_id)
            r = by_id[g.request_id]
            resumes += 1
            rid = f"{g.request_id.split('~')[0]}~{resumes}"
            by_id[rid] = Request(
                rid,
                r.prompt_id,
                0,
                0,
                r.prompt_len,
                r.max_new_tokens,
                r.prompt_token_ids,
                resume=g.as_partial(),
            )
            new.append(by_id[rid])
        eng.submit(new)
        outstanding.update(x.request_id for x in new)

    while pool or outstanding:
        action = rng.random()
        if pool and action < 0.15:
            batch = [pool.pop() for _ in range(min(len(pool), rng.randint(1, 5)))]
            eng.submit(batch)
            outstanding.update(r.request_id for r in batch)
        elif outstanding and action < 0.2:
            resubmit(eng.abort(rng.sample(sorted(outstanding), min(len(outstanding), 2))))
        elif action < 0.23:
            resubmit(eng.pause())
        else:
            rep = eng.step()
            assert rep.busy_slot_s <= eng.capacity * rep.elapsed_s + 1e-12
            for g in rep.finished:
                outstanding.remove(g.request_id)
                final[g.request_id.split("~")[0]] = g
        assert eng.num_unfinished() == len(outstanding)
    assert len(final) == 30 and resumes > 0
    for rid, g in final.items():
        r = by_id[rid]
        assert g.finish_reason in ("stop", "length") and g.n_tokens <= r.max_new_tokens
        assert len(g.token_ids) == len(g.logprobs) == spans_total(g) == g.n_tokens
        if g.n_tokens:
            ref = forward_logprobs(model, r.prompt_token_ids, g.token_ids)
            assert (ref - torch.tensor(g.logprobs)).abs().max().item() < LOGPROB_TOL


def test_a_tied_weight_may_come_once_under_its_first_name():
    """The Ray ranks send a tied lm_head once, as the model's files hold it."""
    import transformers

    cfg = transformers.Qwen2Config(
        vocab_size=40,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    engine = TransformersEngine(transformers.Qwen2ForCausalLM(cfg), capacity=2)
    torch.manual_seed(1)
    new = transformers.Qwen2ForCausalLM(cfg).state_dict()
    del new["lm_head.weight"]
    engine.load_weights(new, 1)
    assert torch.equal(engine.model.lm_head.weight, new["model.embed_tokens.weight"])
    del new["model.norm.weight"]  # a weight that is not tied is still required
    with pytest.raises(ValueError, match="missing \\['model.norm.weight'\\]"):
        engine.load_weights(new, 2)
