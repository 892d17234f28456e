"""Turn (prompt, response) into model tokens: one place, shared by the service and the trainer.

A prompt is either an HH transcript (``"\\n\\nHuman: …\\n\\nAssistant:"``) or a list of chat
messages ``[{"role": "user", "content": …}, …]``; the two convert into each other.  Each model
formats with one *style*:

``pair``   encoder models: the prompt (as an HH transcript) and the response as a sentence pair,
           ``[CLS] prompt [SEP] response [SEP]`` for BERT.
``chat``   the tokenizer's own chat template (or one given in config), prompt messages plus the
           response as the final assistant turn.
``text``   decoder models without a template: the HH transcript followed by the response.

Truncation never silently cuts the response: the prompt loses tokens from the left first; a
response that alone is over the limit raises :class:`ResponseTooLongError` unless the caller
allows cutting it, and every encoding reports how many tokens it lost.

Tokenization uses the Rust tokenizer with padding and truncation switched off (a tokenizer.json
can carry its own padding settings; MiniLM's pads to 128) so the engine sees real lengths.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal, Sequence

from tokenizers import Encoding, Tokenizer

Style = Literal["pair", "chat", "text"]
Message = dict[str, str]
Prompt = str | Sequence[Message]

HUMAN = "\n\nHuman:"
ASSISTANT = "\n\nAssistant:"
_TURN = re.compile(r"\n\n(Human|Assistant):")
_ROLE_OF = {"Human": "user", "Assistant": "assistant"}
_HH_NAME = {"user": "Human", "assistant": "Assistant", "system": "Human"}


class ResponseTooLongError(ValueError):
    """The response alone does not fit the model's context and cutting it was not allowed."""

    def __init__(self, tokens: int, limit: int) -> None:
        super().__init__(
            f"response is {tokens} tokens, over the model's limit of {limit} "
            "(set allow_truncation to cut it)"
        )
        self.tokens = tokens
        self.limit = limit


def parse_hh(transcript: str) -> list[Message]:
    """Split an HH transcript into chat messages; a trailing empty ``Assistant:`` is dropped.

    Text before the first ``Human:`` marker (rare; some rows lack the leading blank line) is
    kept as a user turn so nothing is lost.
    """
    text = transcript if transcript.startswith("\n\n") else "\n\n" + transcript.lstrip("\n")
    parts = _TURN.split(text)
    messages: list[Message] = []
    head = parts[0].strip()
    if head:
        messages.append({"role": "user", "content": head})
    for speaker, content in zip(parts[1::2], parts[2::2]):
        messages.append({"role": _ROLE_OF[speaker], "content": content.strip()})
    if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()
    return messages


def render_hh(messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
    """Render chat messages as an HH transcript ending in ``"\\n\\nAssistant:"``."""
    out = []
    for m in messages:
        name = _HH_NAME.get(m["role"], "Human")
        out.append(f"\n\n{name}: {m['content']}")
    if add_generation_prompt:
        out.append(ASSISTANT)
    return "".join(out)


def prompt_as_text(prompt: Prompt) -> str:
    """The HH transcript of a prompt, whichever form it came in."""
    return prompt if isinstance(prompt, str) else render_hh(prompt)


def prompt_as_messages(prompt: Prompt) -> list[Message]:
    return parse_hh(prompt) if isinstance(prompt, str) else [dict(m) for m in prompt]


@dataclass(frozen=True, slots=True)
class Encoded:
    input_ids: list[int]
    token_type_ids: list[int] | None
    truncated: int  # tokens cut (prompt first, then response when allowed)
    response_truncated: bool
    # Leading tokens that come from the prompt alone (special tokens before it included): items
    # of one prompt share them exactly, so a decoder can compute their KV cache once.
    prefix_len: int = 0

    def __len__(self) -> int:
        return len(self.input_ids)


def _leading_specials(enc: Encoding) -> int:
    n = 0
    for special in enc.special_tokens_mask:
        if not special:
            break
        n += 1
    return n


class Formatter:
    """Encodes (prompt, response) for one model; thread-safe (the Rust tokenizer is)."""

    def __init__(
        self,
        tokenizer: Any,
        style: Style,
        max_length: int,
        chat_template: str | None = None,
        append_eos: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.style = style
        self.max_length = int(max_length)
        self.chat_template = chat_template
        self.append_eos = append_eos
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise ValueError("a fast (Rust) tokenizer is required; this one has no tokenizer.json")
        self._tok = Tokenizer.from_str(backend.to_str())
        self._tok.no_padding()
        self._tok.no_truncation()
        if style == "chat" and chat_template is None and not getattr(tokenizer, "chat_template", None):
            raise ValueError("style 'chat' needs a chat template: the tokenizer has none and none was configured")
        self._eos = tokenizer.eos_token_id if append_eos else None
        if append_eos and self._eos is None:
            raise ValueError("append_eos is set but the tokenizer has no EOS token")
        pair = style == "pair"
        self._special = 0 if style == "chat" else self._tok.post_processor.num_special_tokens_to_add(pair) if self._tok.post_processor else 0
        self._budget = self.max_length - self._special - (1 if self._eos is not None else 0)
        if self._budget < 2:
            raise ValueError(f"max_length {max_length} leaves no room for text")

    # -- text assembly -------------------------------------------------------------------
    def _texts(self, prompt: Prompt, response: str) -> tuple[str, str]:
        if self.style == "chat":
            # An empty prompt is one empty user turn (as the pair and text styles read it):
            # templates refuse a conversation with no messages.
            messages = prompt_as_messages(prompt) or [{"role": "user", "content": ""}]
            kwargs: dict[str, Any] = {"tokenize": False}
            if self.chat_template is not None:
                kwargs["chat_template"] = self.chat_template
            head = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, **kwargs)
            full = self.tokenizer.apply_chat_template(
                messages + [{"role": "assistant", "content": response}], **kwargs
            )
            if full.startswith(head):
                return head, full[len(head):]
            return head, response  # a template that rewrites history: score the plain response
        text = prompt_as_text(prompt)
        if self.style == "text":
            return text, " " + response.lstrip(" ")
        return text, response

    def encode(self, prompt: Prompt, response: str, allow_truncation: bool = False) -> Encoded:
        head, tail = self._texts(prompt, response)
        p = self._tok.encode(head, add_special_tokens=False)
        r = self._tok.encode(tail, add_special_tokens=False)
        cut = 0
        response_cut = False
        n_r = len(r.ids)
        if n_r > self._budget:
            if not allow_truncation:
                raise ResponseTooLongError(n_r, self._budget)
            cut += n_r - self._budget + len(p.ids)
            r.truncate(self._budget, direction="right")
            p = Encoding.merge([], growing_offsets=True)
            response_cut = True
        elif len(p.ids) + n_r > self._budget:
            keep = self._budget - n_r
            cut += len(p.ids) - keep
            p.truncate(keep, direction="left")
        n_p = len(p.ids)
        if self.style == "pair":
            enc = self._tok.post_processor.process(p, r, add_special_tokens=True)
            ids, types = list(enc.ids), list(enc.type_ids)
            prefix = _leading_specials(enc) + n_p
        elif self.style == "text" and self._tok.post_processor is not None:
            # single sequence: prompt tokens then response tokens, special tokens around both
            merged = Encoding.merge([p, r], growing_offsets=True)
            enc = self._tok.post_processor.process(merged, None, add_special_tokens=True)
            ids, types = list(enc.ids), None
            prefix = _leading_specials(enc) + n_p
        else:
            ids, types = list(p.ids) + list(r.ids), None
            prefix = n_p
        if self._eos is not None:
            ids.append(self._eos)
        return Encoded(ids, types, cut, response_cut, prefix if n_p else 0)

    def encode_many(
        self, items: Sequence[tuple[Prompt, str]], allow_truncation: bool = False
    ) -> list[Encoded | ResponseTooLongError]:
        """Encode each item; a response that does not fit is returned as its error, not raised."""
        out: list[Encoded | ResponseTooLongError] = []
        for prompt, response in items:
            try:
                out.append(self.encode(prompt, response, allow_truncation))
            except ResponseTooLongError as exc:
                out.append(exc)
        return out
