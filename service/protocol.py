"""Wire types of the v1 HTTP API, and nothing else.  Pydantic only: no torch, no FastAPI.

Clients, trainers and tests import these to build requests and read responses.  Every float
that crosses the wire is finite: NaN and ±Infinity are rejected on the way in (422) and never
produced on the way out.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictStr, model_validator

from .utility import METHODS

FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
_SURROGATE = re.compile("[\ud800-\udfff]")


def _unicode_text(value: str) -> str:
    # JSON can escape a lone UTF-16 surrogate ("\udc80"); it is no character, and tokenizers fail on it.
    bad = _SURROGATE.search(value)
    if bad:
        raise ValueError(f"not valid Unicode: a lone surrogate (U+{ord(bad.group()):04X}) at character {bad.start()}")
    return value


Text = Annotated[StrictStr, AfterValidator(_unicode_text)]
"""A string of real Unicode characters (what every text field on the wire is)."""
MethodName = Literal["log_sigmoid_sum", "weighted_sum", "transformed", "raw"]
assert set(MethodName.__args__) == set(METHODS)  # type: ignore[attr-defined]


class _Strict(BaseModel):
    # Unknown fields are rejected so a typo ("referenecs") fails loudly instead of being ignored.
    model_config = ConfigDict(extra="forbid")


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: Text


class ScoreItem(_Strict):
    prompt: Text | Annotated[list[ChatMessage], Field(min_length=1)] = Field(
        description="HH transcript ('\\n\\nHuman: …\\n\\nAssistant:') or a list of chat messages"
    )
    response: Annotated[Text, Field(min_length=1)] = Field(description="the response to score")


class ReferenceOverride(_Strict):
    """Per-request reference for one model: exactly one of the fields."""

    constant: FiniteFloat | None = Field(None, description="the same r_ref for every item")
    values: list[FiniteFloat] | None = Field(None, description="one r_ref per item, in item order")
    responses: Annotated[list[Annotated[Text, Field(min_length=1)]], Field(min_length=1)] | None = Field(
        None, description="reference responses: r_ref(x) = mean of r(x, y_ref) over them"
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> "ReferenceOverride":
        given = [k for k in ("constant", "values", "responses") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of 'constant', 'values', 'responses'")
        return self


class ScoreRequest(_Strict):
    items: Annotated[list[ScoreItem], Field(min_length=1)]
    models: Annotated[list[StrictStr], Field(min_length=1)] | None = Field(
        None, description="models to score with (default: the server's default set)"
    )
    method: MethodName | None = Field(None, description="aggregation method (default: server config)")
    weights: dict[str, FiniteFloat] | None = Field(None, description="per-model weights for the aggregate")
    references: dict[str, FiniteFloat | ReferenceOverride] | None = Field(
        None, description="per-model reference override; a bare number means a constant"
    )
    allow_truncation: bool = Field(
        False, description="cut a response that alone exceeds a model's context instead of answering 422"
    )


class ScoreResult(BaseModel):
    rewards: dict[str, float]
    references: dict[str, float]
    utilities: dict[str, float]
    utility: float
    p_good: dict[str, float]
    p_all: float
    truncated: dict[str, int] = Field(description="tokens cut from the input, per model (0: none)")
    tokens: dict[str, int] = Field(description="tokens the model saw, per model")


class ModelInfo(BaseModel):
    revision: str
    backend: str
    dtype: str
    device: str
    max_length: int
    style: str
    reference: str
    path: str


class ScoreResponse(BaseModel):
    results: list[ScoreResult]
    models: dict[str, ModelInfo]
    method: MethodName


class UtilityRequest(_Strict):
    rewards: Annotated[list[Annotated[dict[str, FiniteFloat], Field(min_length=1)]], Field(min_length=1)]
    references: list[dict[str, FiniteFloat]] | None = Field(None, description="one dict per reward dict; default 0")
    method: MethodName | None = None
    weights: dict[str, FiniteFloat] | None = None

    @model_validator(mode="after")
    def _same_length(self) -> "UtilityRequest":
        if self.references is not None and len(self.references) != len(self.rewards):
            raise ValueError(
                f"references has {len(self.references)} entries but rewards has {len(self.rewards)}"
            )
        return self


class UtilityResult(BaseModel):
    utilities: dict[str, float]
    utility: float
    p_good: dict[str, float]
    p_all: float


class UtilityResponse(BaseModel):
    results: list[UtilityResult]
    method: MethodName


class ModelsResponse(BaseModel):
    models: dict[str, ModelInfo]
    default_models: list[str]
    default_method: MethodName


class ErrorBody(BaseModel):
    code: str
    message: str
    field: str | None = None
    details: list[dict[str, Any]] | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
