"""The tiny default model and the character tokenizer."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from sortedrl.models.tiny import (  # noqa: E402
    BOS_ID,
    EOS_ID,
    PAD_ID,
    UNK_ID,
    build_char_tokenizer,
    build_tiny_model,
    load_tiny,
    num_parameters,
    save_tiny,
)

ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz +-*=:?\n.,"


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer(ALPHABET)


def test_tokenizer_one_token_per_character(tok):
    assert len(tok) == len(ALPHABET) + 4
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (
        PAD_ID,
        BOS_ID,
        EOS_ID,
        UNK_ID,
    )
    text = "12+34=46\nwhat is 7*8? a, b."
    ids = tok(text, add_special_tokens=False).input_ids
    assert len(ids) == len(text)
    assert tok.decode(ids) == text
    assert tok.convert_ids_to_tokens(ids) == list(text)


def test_tokenizer_specials_and_round_trip(tok):
    ids = tok("ab c").input_ids
    assert ids[0] == BOS_ID and len(ids) == 5
    assert tok.decode(ids + [EOS_ID], skip_special_tokens=True) == "ab c"
    assert tok("a~b", add_special_tokens=False).input_ids[1] == UNK_ID
    # Every character of the alphabet, newline included, survives.
    all_ids = tok(ALPHABET, add_special_tokens=False).input_ids
    assert len(set(all_ids)) == len(ALPHABET) and min(all_ids) >= 4
    assert tok.decode(all_ids) == ALPHABET


def test_tokenizer_dedupes_and_rejects_empty():
    assert len(build_char_tokenizer("aab")) == 4 + 2
    with pytest.raises(ValueError):
        build_char_tokenizer("")


def test_model_size_and_determinism(tok):
    m1 = build_tiny_model(len(tok), seed=3)
    assert 500_000 <= num_parameters(m1) <= 1_000_000
    cfg = m1.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (128, 4, 4)
    assert (cfg.num_key_value_heads, cfg.intermediate_size) == (2, 384)
    assert cfg.max_position_embeddings == 512
    assert cfg.vocab_size == len(tok) and cfg.eos_token_id == EOS_ID
    state = torch.get_rng_state()
    m2 = build_tiny_model(len(tok), seed=3)
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is left alone
    m3 = build_tiny_model(len(tok), seed=4)
    for (n, a), b in zip(m1.named_parameters(), m2.parameters(), strict=True):
        assert torch.equal(a, b), n
    assert not torch.equal(m1.lm_head.weight, m3.lm_head.weight)


def test_unknown_size(tok):
    with pytest.raises(ValueError, match="size"):
        build_tiny_model(len(tok), seed=0, size="huge")


def test_save_and_load_round_trip(tok, tmp_path):
    model = build_tiny_model(len(tok), seed=1, size="micro")
    save_tiny(model, tok, tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").is_file()
    model2, tok2 = load_tiny(tmp_path / "m")
    assert tok2(ALPHABET).input_ids == tok(ALPHABET).input_ids
    assert tok2.eos_token_id == EOS_ID and tok2.pad_token_id == PAD_ID
    ids = torch.tensor([tok("1+2=3").input_ids])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model2(ids).logits)
    with pytest.raises(FileNotFoundError):
        load_tiny(tmp_path / "nothing")
