"""Each FSDP2 rank builds the model on the meta device and reads only its own shards from the
safetensors files: the weights equal a full `from_pretrained` load bit for bit, and a trainer
built so makes the same update as one built from the whole model.

Two processes on gloo (torch.multiprocessing, no Ray) run every scenario once for the module;
rank 0 saves what the tests compare.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402

from sortedrl.training.config import TrainerConfig  # noqa: E402
from sortedrl.training.distributed import (  # noqa: E402
    FSDPTrainer,
    init_process_group,
    shard_model,
)
from sortedrl.training.sharded_load import load_sharded, parameters_on_meta  # noqa: E402
from tests.grpo_batches import make_batch  # noqa: E402
from tests.tiny_llama import tiny_llama  # noqa: E402

WORLD = 2
CONFIG = TrainerConfig(lr=1e-3, adam_eps=1e-6, mini_batches=2, kl_coef=0.1)


def qwen2_tied(seed: int):
    """A Qwen2 with tied embeddings (saved once, under the embedding's name) and an odd
    vocabulary, so the two ranks' shards of it differ in size (26 and 25 rows)."""
    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(
        vocab_size=51,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    return transformers.Qwen2ForCausalLM(cfg)


MODELS = {"qwen2_tied": qwen2_tied, "llama_untied": tiny_llama}  # tiny_llama: untied


def rank_main(rank: int, port: int, root: str) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    torch.set_num_threads(1)
    device = torch.device("cpu")
    init_process_group(rank, WORLD, "127.0.0.1", port, device)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    try:
        for name in MODELS:
            path = str(Path(root) / name)
            mesh = init_device_mesh("cpu", (WORLD,))
            model = load_sharded(path, lambda m, mesh=mesh: shard_model(m, mesh), device, mesh)
            local = {n: p.to_local().clone() for n, p in model.named_parameters()}
            tied = model.lm_head.weight is model.model.embed_tokens.weight
            buffers = {n: b.clone() for n, b in model.named_buffers()}
            full = get_model_state_dict(model, options=options)
            torch.save(
                {"local": local, "tied": tied, "buffers": buffers, "full": full},
                Path(root) / f"{name}.rank{rank}.pt",
            )
            # One update from the files against one from the whole model.
            results = {}
            for source in ("files", "object"):
                given = path if source == "files" else MODELS[name](0)
                trainer = FSDPTrainer(given, CONFIG, device, seed=3)
                trainer.update(make_batch(0))  # token ids < 30: in both vocabularies
                results[source] = trainer.full_state_dict()
            if rank == 0:
                torch.save(results, Path(root) / f"{name}.update.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    for name, build in MODELS.items():
        build(0).save_pretrained(root / name, safe_serialization=True)
    mp.spawn(rank_main, args=(_free_port(), str(root)), nprocs=WORLD, join=True)
    return root


def _load(root: Path, name: str, what: str):
    return torch.load(root / f"{name}.{what}.pt", weights_only=False)


@pytest.mark.parametrize("name", list(MODELS))
def test_the_gathered_weights_equal_a_full_load_bit_for_bit(ranks, name):
    full = transformers.AutoModelForCausalLM.from_pretrained(ranks / name, dtype=torch.float32)
    want = full.state_dict()
    got = _load(ranks, name, "rank0")["full"]  # gathered onto rank 0's CPU
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k


@pytest.mark.parametrize("name", list(MODELS))
def test_each_rank_holds_only_its_rows_of_every_weight(ranks, name):
    want = transformers.AutoModelForCausalLM.from_pretrained(ranks / name, dtype=torch.float32)
    params = dict(want.named_parameters())
    held = 0
    for rank in range(WORLD):
        local = _load(ranks, name, f"rank{rank}")["local"]
        assert local.keys() == params.keys()
        for k, shard in local.items():
            rows = params[k].shape[0]
            chunk = -(-rows // WORLD)  # FSDP2 shards dim 0 as torch.chunk does
            start = min(rank * chunk, rows)
            expected = params[k].detach()[start : start + chunk]
            assert torch.equal(shard, expected), (rank, k)
            held += shard.numel()
    # the two ranks' shards together are the model once: neither holds it whole
    assert held == sum(p.numel() for p in params.values())


def test_tied_embeddings_stay_tied_and_computed_buffers_are_right(ranks):
    want = transformers.AutoModelForCausalLM.from_pretrained(ranks / "qwen2_tied")
    for rank in range(WORLD):
        saved = _load(ranks, "qwen2_tied", f"rank{rank}")
        assert saved["tied"]
        for n, b in want.named_buffers():  # rotary inv_freq: in no file, computed
            assert torch.equal(saved["buffers"][n], b), n


@pytest.mark.parametrize("name", list(MODELS))
def test_a_trainer_from_the_files_updates_as_one_from_the_whole_model(ranks, name):
    results = _load(ranks, name, "update")
    files, whole = results["files"], results["object"]
    assert files.keys() == whole.keys()
    for k in whole:
        assert torch.equal(files[k], whole[k]), k
    initial = MODELS[name](0).state_dict()
    assert any(not torch.equal(whole[k], initial[k]) for k in whole)  # the update moved them


def test_parameters_built_on_meta_cost_nothing_and_buffers_stay_real():
    with parameters_on_meta():
        model = qwen2_tied(0)
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert {b.device.type for b in model.buffers()} == {"cpu"}
    assert model.lm_head.weight is model.model.embed_tokens.weight
    # and the patch is gone afterwards
    assert {p.device.type for p in qwen2_tied(0).parameters()} == {"cpu"}
