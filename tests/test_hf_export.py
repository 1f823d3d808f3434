"""Writing a model's weights as a Hugging Face directory one tensor at a time, and reading a
trainer checkpoint's weights into one process, here on an unsharded model in one process (the
sharded path, over two Ray ranks: `tests/test_ray_trainers.py`)."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from sortedrl.training.distributed import load_checkpoint_weights  # noqa: E402
from sortedrl.training.hf_export import export_weights  # noqa: E402
from tests.tiny_llama import tiny_llama  # noqa: E402


def _same(a, b) -> bool:
    a, b = a.state_dict(), b.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_shards_of_a_bounded_size_and_their_index_load_in_transformers(tmp_path):
    model = tiny_llama(0)
    sizes = {k: v.numel() * v.element_size() for k, v in model.state_dict().items()}
    limit = max(sizes.values())  # the largest tensor fills a file alone
    export_weights(model, tmp_path, writer=True, shard_bytes=limit)
    model.config.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(sizes.values())
    assert set(index["weight_map"]) == set(sizes)
    for name in set(index["weight_map"].values()):  # each file: a header, then <= limit
        with open(tmp_path / name, "rb") as f:
            header = int.from_bytes(f.read(8), "little")
        assert (tmp_path / name).stat().st_size - 8 - header <= limit
    assert not list(tmp_path.glob("*.tmp"))
    assert _same(transformers.AutoModelForCausalLM.from_pretrained(tmp_path), model)


def test_a_rank_that_does_not_write_writes_nothing_and_a_bad_size_is_refused(tmp_path):
    export_weights(tiny_llama(0), tmp_path / "no", writer=False)
    assert not (tmp_path / "no").exists()
    with pytest.raises(ValueError, match="shard_bytes must be positive"):
        export_weights(tiny_llama(0), tmp_path, writer=True, shard_bytes=0)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_a_checkpoints_weights_load_into_one_process_and_a_model_that_differs_is_named(tmp_path):
    import torch.distributed.checkpoint as dcp

    saved = tiny_llama(0)
    dcp.save(
        {"model": saved.state_dict(), "optimizer": {}}, checkpoint_id=str(tmp_path), no_dist=True
    )
    fresh = tiny_llama(1)
    load_checkpoint_weights(fresh, tmp_path, set())
    assert _same(fresh, saved)
    with pytest.raises(ValueError, match=r"do not load \(Missing key in checkpoint.*model\.weight"):
        load_checkpoint_weights(torch.nn.Linear(2, 2), tmp_path, set())
    with pytest.raises(ValueError, match=r"no-such: the model's weights do not load"):
        load_checkpoint_weights(fresh, tmp_path / "no-such", set())
