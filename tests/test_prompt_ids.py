"""Prompts reach the model through the tokenizer's chat template when it has one."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from sortedrl.commands.evaluate import prompt_token_ids  # noqa: E402
from sortedrl.models.tiny import build_char_tokenizer  # noqa: E402


def test_plain_tokenizer_gets_bos_plus_text():
    tok = build_char_tokenizer("abc:")
    assert tok.decode(prompt_token_ids(tok, "ab:"), skip_special_tokens=True) == "ab:"
    assert prompt_token_ids(tok, "ab:")[0] == tok.bos_token_id


def test_chat_template_is_applied():
    tok = build_char_tokenizer("abc:[]")
    tok.chat_template = (
        "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
        "{% if add_generation_prompt %}:{% endif %}"
    )
    assert tok.decode(prompt_token_ids(tok, "abc")) == "[abc]:"
    # task.chat_template=false: the raw prompt, as a tokenizer without a template gives it
    raw = prompt_token_ids(tok, "abc", chat_template=False)
    assert raw[0] == tok.bos_token_id and tok.decode(raw, skip_special_tokens=True) == "abc"
