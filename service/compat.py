"""External RL trainers, unchanged: OpenRLHF's remote reward model and verl's ``/classify``.

OpenRLHF (``--remote_rm_url http://host:port/get_reward``) posts
``{"query": [str], "prompts": [str], "labels": [any]}`` — one sample per request, many
concurrently — and reads ``{"rewards": [float], "scores": [float], "extra_logs": {str: [float]}}``.
verl's reward loop posts vLLM's ``/classify`` body ``{"model", "input", "activation", …}`` and
reads ``data[i].probs[-1]``.

Both send text already rendered with the *policy's* chat template.  :class:`TrainerAdapter`
turns each into the (prompt, response) the reward models expect, per ``compat`` in the config:

``passthrough``    the prompt is used as it is (an HH transcript or plain text); the response is
                   the rest of the query after it.  With ``policy_tokenizer`` set, its EOS and
                   pad tokens are cut (leading pads of left-padded batches too).  ``/classify`` input must be an HH transcript
                   ending in an assistant turn.
``chat_template``  the text is parsed back into turns with the policy tokenizer's template
                   (:mod:`service.chat_parse`), so chat-style reward models get messages.

Either way trailing EOS / pad / end-of-turn tokens (those of ``policy_tokenizer`` and
``compat.end_tokens``) are cut from the response as whole tokens.
Requests from different trainer workers are batched together by the engine like any others,
so one-sample requests cost no more than a batch.  Field names in 4xx errors point at the
offending sample (``query.3``).  Unknown body fields are accepted and ignored here (these
trainers add fields across releases), unlike ``/v1/*``, which rejects them.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictStr

from . import protocol as p
from .chat_parse import strip_tokens_end, strip_tokens_start
from .config import CompatConfig
from .errors import InvalidRequest
from .formatting import ASSISTANT, Prompt

# -- wire types --------------------------------------------------------------------------------


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class GetRewardRequest(_Lenient):
    query: Annotated[list[p.Text], Field(min_length=1)] = Field(
        description="prompt + response, rendered with the policy's chat template (special tokens included)")
    prompts: list[p.Text] | None = Field(None, description="the rendered prompt of each query")
    labels: list[Any] | None = Field(None, description="ignored (reference answers for rule-based rewards)")


class GetRewardResponse(BaseModel):
    rewards: list[float] = Field(description="the configured utility (default: Σ log σ(r − r_ref)) per query")
    scores: list[float] = Field(description="p(all good) = Π σ(r − r_ref), in [0, 1]")
    extra_logs: dict[str, list[float]] = Field(description="per model: raw reward and transformed utility")


class ClassifyRequest(_Lenient):
    model: StrictStr | None = Field(None, description="a hosted model name → its raw reward; else the utility")
    input: p.Text | Annotated[list[p.Text], Field(min_length=1)] = Field(
        description="rendered conversation(s) ending in the response to score")
    activation: bool | None = Field(None, description="apply the sigmoid (default true, as vLLM)")
    use_activation: bool | None = Field(None, description="vLLM's newer name for activation")


class ClassifyData(BaseModel):
    index: int
    label: str
    probs: list[float]
    num_classes: int
    object: str = "classification"


class ClassifyResponse(BaseModel):
    id: str
    object: str = "list"
    created: int
    model: str
    data: list[ClassifyData]
    usage: dict[str, int]


# -- the adapter ---------------------------------------------------------------------------------


class TrainerAdapter:
    """Rendered trainer text → (prompt, response), per :class:`service.config.CompatConfig`."""

    def __init__(self, cfg: CompatConfig, chat: Any = None, tokenizer: Any = None) -> None:
        self.cfg = cfg
        self.chat = chat  # a service.chat_parse.RenderedChat when the template is used
        specials = [getattr(tokenizer, "eos_token", None), getattr(tokenizer, "pad_token", None)] if tokenizer else []
        tokens = {t for t in [*cfg.end_tokens, *specials] if t and t.strip()}
        self.end_tokens = tuple(sorted(tokens, key=len, reverse=True))  # cut from the end of a response
        self.pad_tokens = tuple(t for t in specials if t and t.strip())  # cut from the start (left padding)

    @classmethod
    def build(cls, cfg: CompatConfig, base_dir: Any = None) -> "TrainerAdapter":
        if not cfg.policy_tokenizer:
            return cls(cfg)
        from transformers import AutoTokenizer

        from .chat_parse import RenderedChat
        from .modelpath import resolve_model_path

        path = resolve_model_path(cfg.policy_tokenizer, base_dir)
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
        if not cfg.uses_template:  # passthrough: the tokenizer only names the EOS / pad tokens to cut
            return cls(cfg, tokenizer=tok)
        return cls(cfg, RenderedChat(tok, keep_system=cfg.keep_system, extra_end_tokens=tuple(cfg.end_tokens)), tok)

    def _strip(self, text: str) -> str:
        return self.chat.strip_end(text)[0] if self.chat is not None else strip_tokens_end(text, self.end_tokens)[0]

    def _strip_start(self, text: str) -> str:
        return strip_tokens_start(text, self.pad_tokens)

    def query_item(self, query: str, prompt: str | None, field: str) -> tuple[Prompt, str]:
        """OpenRLHF: (prompt, response) of one query and its rendered prompt."""
        if self.chat is not None:
            try:
                messages, response = self.chat.split(query, prompt)
            except ValueError as exc:
                raise InvalidRequest(f"{field}: {exc}", field) from None
            if not messages:
                raise InvalidRequest(f"{field}: no user turn found in the rendered prompt", field)
            return messages, response
        if prompt is None:
            return self.transcript_item(query, field)
        query, prompt = self._strip_start(query), self._strip_start(prompt)
        if not query.startswith(prompt):
            raise InvalidRequest(f"{field}: the query does not start with its prompt (prompts.{field.split('.')[-1]})",
                                 field)
        return prompt, self._strip(query[len(prompt):]).strip()

    def transcript_item(self, text: str, field: str) -> tuple[Prompt, str]:
        """verl: (prompt, response) of one whole rendered conversation."""
        if self.chat is not None:
            return self.query_item(text, None, field)
        at = text.rfind(ASSISTANT)
        if at < 0:
            raise InvalidRequest(f"{field}: expected an HH transcript ending in an {ASSISTANT.strip()!r} turn "
                                 "(or configure compat.policy_tokenizer for chat-template text)", field)
        return text[: at + len(ASSISTANT)], self._strip(text[at + len(ASSISTANT):]).strip()


def score_request(pairs: list[tuple[Prompt, str]], allow_truncation: bool, models: list[str] | None = None,
                  method: p.MethodName | None = None) -> p.ScoreRequest:
    """A ScoreRequest of already-validated pairs.  Built without re-validation so an empty
    response (a policy that answered with EOS alone) is scored as empty, not refused: a
    trainer cannot fix it, and OpenRLHF would silently drop the sample after five refusals."""
    items = [p.ScoreItem.model_construct(
        prompt=pr if isinstance(pr, str) else [p.ChatMessage(**m) for m in pr], response=r) for pr, r in pairs]
    return p.ScoreRequest.model_construct(items=items, models=models, method=method, weights=None, references=None,
                                          allow_truncation=allow_truncation)


def get_reward_response(results: list[p.ScoreResult]) -> GetRewardResponse:
    logs: dict[str, list[float]] = {}
    for r in results:
        for name, value in r.rewards.items():
            logs.setdefault(f"{name}/reward", []).append(value)
            logs.setdefault(f"{name}/utility", []).append(r.utilities[name])
            logs.setdefault(f"{name}/truncated", []).append(float(r.truncated[name] > 0))
    return GetRewardResponse(rewards=[r.utility for r in results], scores=[r.p_all for r in results], extra_logs=logs)


def classify_response(req: ClassifyRequest, results: list[p.ScoreResult], model: str | None, method: str
                      ) -> ClassifyResponse:
    from .utility import sigmoid

    activation = req.use_activation if req.use_activation is not None else req.activation
    activation = True if activation is None else activation
    data = []
    for i, r in enumerate(results):
        if model is not None:
            value = sigmoid(r.rewards[model]) if activation else r.rewards[model]
        elif activation:
            value = r.p_all if method == "log_sigmoid_sum" else sigmoid(r.utility)
        else:
            value = r.utility
        data.append(ClassifyData(index=i, label=model or "utility", probs=[value], num_classes=1))
    tokens = sum(max(r.tokens.values(), default=0) for r in results)
    return ClassifyResponse(id=f"classify-{uuid.uuid4().hex}", created=int(time.time()), model=req.model or "logand",
                            data=data, usage={"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0})
