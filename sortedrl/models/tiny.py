"""A tiny default model and tokenizer, built locally with nothing downloaded.

The tokenizer is character level (each character of an alphabet is one token) with the special
tokens `<pad>` (id 0), `<bos>` (id 1), `<eos>` (id 2) and `<unk>` (id 3); the alphabet's
characters follow in order. Encoding a text with `add_special_tokens=True` (the default)
prepends `<bos>`.

The model is a `LlamaForCausalLM` of about 0.8M parameters at the default size, initialised
deterministically from a seed. Both save and load as an ordinary Hugging Face directory
(`save_pretrained` / `from_pretrained`, weights in safetensors).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN)
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3

#: Named model sizes: hidden, layers, attention heads, KV heads, MLP width.
MODEL_SIZES: dict[str, dict[str, int]] = {
    # ~0.1M parameters: for fast tests.
    "micro": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=192,
    ),
    # ~0.8M parameters: the embedded default.
    "default": dict(
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=384,
    ),
    # ~3M parameters.
    "small": dict(
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        intermediate_size=768,
    ),
}


def build_char_tokenizer(alphabet: str) -> PreTrainedTokenizerFast:
    """A character-level tokenizer: every character of `alphabet` is one token.

    Repeated characters in `alphabet` are kept once. Characters outside the alphabet encode to
    `<unk>`. The result round-trips through `save_pretrained` / `AutoTokenizer.from_pretrained`.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = list(dict.fromkeys(alphabet))
    if not chars:
        raise ValueError("build_char_tokenizer: the alphabet is empty")
    vocab: dict[str, int] = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in chars:
        vocab[ch] = len(vocab)

    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    # Isolate every single character (newlines included).
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A $B",
        special_tokens=[(BOS_TOKEN, BOS_ID)],
    )
    backend.add_special_tokens(list(SPECIAL_TOKENS))

    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=1 << 20,
    )


def tiny_config(
    vocab_size: int,
    size: str = "default",
    *,
    max_position_embeddings: int = 512,
    pad_token_id: int = PAD_ID,
    bos_token_id: int = BOS_ID,
    eos_token_id: int = EOS_ID,
    **overrides: Any,
):
    """The `LlamaConfig` of a tiny model of a named size (see `MODEL_SIZES`)."""
    from transformers import LlamaConfig

    if size not in MODEL_SIZES:
        raise ValueError(f"unknown tiny model size {size!r}; choose one of {sorted(MODEL_SIZES)}")
    if vocab_size <= max(pad_token_id, bos_token_id, eos_token_id):
        raise ValueError(f"vocab_size {vocab_size} is too small for the special token ids")
    kwargs: dict[str, Any] = dict(MODEL_SIZES[size])
    kwargs.update(overrides)
    return LlamaConfig(
        vocab_size=vocab_size,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        tie_word_embeddings=False,
        **kwargs,
    )


def build_tiny_model(
    vocab_size: int,
    seed: int,
    size: str = "default",
    *,
    attn_implementation: str = "sdpa",
    **config_overrides: Any,
) -> LlamaForCausalLM:
    """A freshly initialised tiny `LlamaForCausalLM`, the same for the same arguments.

    The global torch RNG is left as it was. The model is in fp32 and in eval mode.
    """
    import torch
    from transformers import LlamaForCausalLM

    config = tiny_config(vocab_size, size, **config_overrides)
    config._attn_implementation = attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = config.pad_token_id
    model.generation_config.bos_token_id = config.bos_token_id
    model.generation_config.eos_token_id = config.eos_token_id
    return model.eval()


def num_parameters(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def save_tiny(model: Any, tokenizer: Any, path: str | Path) -> Path:
    """Save model (safetensors) and tokenizer into one Hugging Face directory."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def load_tiny(path: str | Path, *, attn_implementation: str = "sdpa") -> tuple[Any, Any]:
    """Load a `(model, tokenizer)` pair from a Hugging Face directory (local files only)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not a model directory (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(
        path, local_files_only=True, attn_implementation=attn_implementation
    )
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model.eval(), tokenizer
