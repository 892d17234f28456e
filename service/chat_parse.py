"""Reading chat-template-rendered text back into turns: what external RL trainers send.

OpenRLHF and verl send the *rendered* conversation (the policy's chat template applied,
special tokens included), while reward models expect (prompt, response) in their own format.
:class:`RenderedChat` learns a template's markup by rendering a probe conversation with sentinel
contents — no per-family rules — and then:

* :meth:`RenderedChat.strip_end` removes trailing EOS / pad / end-of-turn tokens as *whole
  tokens* (``"<|im_end|>"`` as one unit, never a character set);
* :meth:`RenderedChat.parse` turns rendered text into chat messages (the template's default
  system prompt dropped unless asked to keep it);
* :meth:`RenderedChat.split` splits ``query`` = rendered prompt + response into the prompt's
  messages and the response text.

A template whose turns cannot be learnt this way (one that folds the system prompt into the
first user turn, say) raises :class:`TemplateError` at start-up, naming the tokenizer; the
``passthrough`` format is then the way to go.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

ROLES = ("system", "user", "assistant")
_S = {"system": "\x02SYSTEM\x03", "user": "\x02USER\x03", "assistant": "\x02ASSISTANT\x03"}


class TemplateError(ValueError):
    """A chat template whose turn markup cannot be learnt from a probe rendering."""


@dataclass(frozen=True)
class Markup:
    headers: dict[str, str]  # role → text right before a turn's content
    footer: str  # text right after a turn's content (end of turn)
    generation_prompt: str  # what add_generation_prompt appends


def _between(text: str, a: str, b: str) -> str:
    i, j = text.index(a) + len(a), text.index(b)
    if j < i:
        raise TemplateError("turns rendered out of order")
    return text[i:j]


def learn_markup(render: Any) -> Markup:
    """``render(messages, add_generation_prompt)`` → text; learn headers and footer from probes."""
    try:
        full = render([{"role": r, "content": _S[r]} for r in ("system", "user", "assistant")]
                      + [{"role": "user", "content": _S["user"] + "2"}], False)
        bare = render([{"role": "user", "content": _S["user"]}], False)
        with_gen = render([{"role": "user", "content": _S["user"]}], True)
    except Exception as exc:  # template errors come in many types (jinja, ValueError, …)
        raise TemplateError(f"the chat template cannot render a system/user/assistant probe: {exc}") from exc
    if any(_S[r] not in full for r in ROLES) or full.count(_S["system"]) != 1:
        raise TemplateError("the chat template does not render each turn's content once")
    footer = full[full.index(_S["assistant"]) + len(_S["assistant"]) : full.index(_S["user"] + "2")]
    user_gap = _between(full, _S["system"], _S["user"])
    asst_gap = _between(full, _S["user"], _S["assistant"])
    after_user = bare[bare.index(_S["user"]) + len(_S["user"]):]
    # the end-of-turn footer is the common prefix of what follows a user and an assistant turn
    end = _common_prefix([after_user, user_gap, asst_gap])
    if not end:
        raise TemplateError("no common end-of-turn marker after user and assistant turns")
    headers = {"user": user_gap[len(end):], "assistant": asst_gap[len(end):],
               "system": full[: full.index(_S["system"])]}
    second_user = footer[len(end):] if footer.startswith(end) else ""
    if second_user and second_user != headers["user"]:
        raise TemplateError("the user header differs between turns")
    gen = with_gen[len(bare):]
    if not headers["user"] or not headers["assistant"]:
        raise TemplateError("empty user or assistant header: turns are not delimited")
    return Markup(headers=headers, footer=end, generation_prompt=gen)


def strip_tokens_end(text: str, tokens: tuple[str, ...]) -> tuple[str, int]:
    """``text`` without trailing ``tokens`` (whole tokens, longest first) and whitespace; how many
    tokens were cut."""
    cut = 0
    while True:
        text = text.rstrip()
        tok = next((t for t in tokens if text.endswith(t)), None)
        if tok is None:
            return text, cut
        text = text[: -len(tok)]
        cut += 1


def strip_tokens_start(text: str, tokens: tuple[str, ...]) -> str:
    """``text`` without leading ``tokens`` (whole tokens)."""
    while True:
        tok = next((t for t in tokens if text.startswith(t)), None)
        if tok is None:
            return text
        text = text[len(tok):]


def _common_prefix(texts: list[str]) -> str:
    out = texts[0]
    for t in texts[1:]:
        n = 0
        while n < min(len(out), len(t)) and out[n] == t[n]:
            n += 1
        out = out[:n]
    return out


class RenderedChat:
    """Parse text rendered with one tokenizer's chat template (see module docstring)."""

    def __init__(self, tokenizer: Any, keep_system: bool = False, extra_end_tokens: tuple[str, ...] = ()) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise TemplateError(f"tokenizer {getattr(tokenizer, 'name_or_path', '?')} has no chat template")

        def render(messages: list[dict[str, str]], gen: bool) -> str:
            return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen))

        self.markup = learn_markup(render)
        self.keep_system = keep_system
        ends = {self.markup.footer.strip(), tokenizer.eos_token, tokenizer.pad_token, *extra_end_tokens}
        self.end_tokens = tuple(sorted((t for t in ends if t and t.strip()), key=len, reverse=True))
        self.pad_tokens = tuple(t for t in {tokenizer.pad_token, tokenizer.eos_token} if t and t.strip())
        # a whitespace-only footer ("\n\n") also occurs inside turns: then only headers delimit turns
        self.footer = self.markup.footer if self.markup.footer.strip() else None
        # text before the first header (BOS, a template's preamble) belongs to no turn
        self.starts = {r: h for r, h in self.markup.headers.items() if h}

    def strip_end(self, text: str) -> tuple[str, int]:
        """``text`` without trailing end tokens (whole tokens) and whitespace; how many were cut."""
        return strip_tokens_end(text, self.end_tokens)

    def strip_start(self, text: str) -> str:
        """``text`` without leading pad tokens (trainers decode left-padded batches)."""
        return strip_tokens_start(text, self.pad_tokens)

    def parse(self, text: str, drop_empty_last: bool = True) -> list[dict[str, str]]:
        """Messages of a rendered conversation; a trailing empty assistant turn (the generation
        prompt) is dropped unless told otherwise; the system turn is dropped unless ``keep_system``."""
        messages = []
        pos = self._next_header(text, 0)
        while pos is not None:
            role, at, header = pos
            start = at + len(header)
            nxt = self._next_header(text, start)
            stop = nxt[1] if nxt else len(text)
            end_of_turn = text.find(self.footer, start) if self.footer else -1
            if 0 <= end_of_turn < stop:
                stop = end_of_turn
            content, _ = self.strip_end(text[start:stop])
            messages.append({"role": role, "content": content.strip()})
            pos = nxt
        if drop_empty_last and messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
            messages.pop()
        if not self.keep_system:
            messages = [m for m in messages if m["role"] != "system"]
        return messages

    def _next_header(self, text: str, start: int) -> tuple[str, int, str] | None:
        best: tuple[str, int, str] | None = None
        for role, header in self.starts.items():
            at = text.find(header, start)
            if at >= 0 and (best is None or at < best[1] or (at == best[1] and len(header) > len(best[2]))):
                best = (role, at, header)
        return best

    def split(self, query: str, prompt: str | None) -> tuple[list[dict[str, str]], str]:
        """(prompt messages, response) of ``query``; the response is the rest of ``query`` after
        ``prompt`` when it starts with it, else the last assistant turn of the parsed query."""
        query = self.strip_start(query)
        prompt = self.strip_start(prompt) if prompt is not None else None
        if prompt is not None and query.startswith(prompt):
            response, _ = self.strip_end(query[len(prompt):])
            return self.parse(prompt), response.strip()
        messages = self.parse(query, drop_empty_last=False)  # an empty answer is still an answer
        if not messages or messages[-1]["role"] != "assistant":
            raise ValueError("the query has no assistant turn after its prompt")
        return messages[:-1], messages[-1]["content"]
