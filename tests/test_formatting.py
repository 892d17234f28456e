"""Input formatting: HH transcripts and chat messages, styles, and truncation that never lies."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from service.formatting import Formatter, ResponseTooLongError, parse_hh, render_hh

LONG_PROMPT = "\n\nHuman: " + " ".join(["what is the weather like today"] * 20) + "\n\nAssistant:"


def test_hh_round_trip_multi_turn() -> None:
    text = "\n\nHuman: a b\n\nAssistant: c\n\nHuman: d\n\nAssistant:"
    messages = parse_hh(text)
    assert messages == [{"role": "user", "content": "a b"}, {"role": "assistant", "content": "c"},
                        {"role": "user", "content": "d"}]
    assert render_hh(messages) == text


def test_messages_and_transcript_encode_identically(tiny_bert: Path) -> None:
    fmt = Formatter(AutoTokenizer.from_pretrained(tiny_bert), "pair", 128)
    text = "\n\nHuman: how do i bake\n\nAssistant:"
    assert fmt.encode(text, "buy flour") == fmt.encode(parse_hh(text), "buy flour")


def test_prompt_is_cut_from_the_left_and_reported(tiny_bert: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    fmt = Formatter(tok, "pair", 32)
    e = fmt.encode(LONG_PROMPT, "it is cold")
    assert len(e) == 32 and e.truncated > 0 and not e.response_truncated
    tokens = tok.convert_ids_to_tokens(e.input_ids)
    assert tokens[-5:] == ["[SEP]", "it", "is", "cold", "[SEP]"]  # the response is whole
    assert "assistant" in tokens  # the end of the prompt (most recent turn) is kept
    full = Formatter(tok, "pair", 10_000).encode(LONG_PROMPT, "it is cold")
    assert e.truncated == len(full) - 32


def test_response_over_limit_is_refused_unless_allowed(tiny_bert: Path) -> None:
    fmt = Formatter(AutoTokenizer.from_pretrained(tiny_bert), "pair", 16)
    long_response = "the dog and the cat " * 10
    with pytest.raises(ResponseTooLongError, match="over the model's limit"):
        fmt.encode("\n\nHuman: hi\n\nAssistant:", long_response)
    e = fmt.encode("\n\nHuman: hi\n\nAssistant:", long_response, allow_truncation=True)
    assert len(e) == 16 and e.response_truncated and e.truncated > 0


def test_chat_style_uses_the_template(tiny_gpt2: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_gpt2)
    fmt = Formatter(tok, "chat", 128)
    e = fmt.encode("\n\nHuman: hi\n\nAssistant:", "hello")
    tokens = tok.convert_ids_to_tokens(e.input_ids)
    assert tokens[0] == "<|user|>" and "<|assistant|>" in tokens and tokens[-1] == "<|end|>"


def test_chat_style_without_template_is_a_clear_error(tiny_bert: Path) -> None:
    with pytest.raises(ValueError, match="chat template"):
        Formatter(AutoTokenizer.from_pretrained(tiny_bert), "chat", 64)


def test_text_style_with_eos(tiny_gpt2: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_gpt2)
    e = Formatter(tok, "text", 64, append_eos=True).encode("\n\nHuman: hi\n\nAssistant:", "hello")
    assert e.input_ids[-1] == tok.eos_token_id and e.token_type_ids is None
