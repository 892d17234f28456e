"""HTTP routes: thin.  Fetch the service from app.state, call it, return its wire type."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from .. import protocol as p
from ..compat import (ClassifyRequest, ClassifyResponse, GetRewardRequest, GetRewardResponse, TrainerAdapter,
                      classify_response, get_reward_response, score_request)
from ..errors import InvalidRequest, NotReady
from ..scoring import ScoringService
from .errors import error_response

router = APIRouter()
ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": p.ErrorResponse, "description": "the body is not valid JSON (or not UTF-8)"},
    401: {"model": p.ErrorResponse, "description": "missing or wrong API key"},
    413: {"model": p.ErrorResponse, "description": "over a size limit"},
    422: {"model": p.ErrorResponse, "description": "invalid input; `field` names it"},
    429: {"model": p.ErrorResponse, "description": "queue full; retry after Retry-After seconds"},
    500: {"model": p.ErrorResponse, "description": "a model failed on this request's batch (only that batch)"},
    503: {"model": p.ErrorResponse, "description": "not ready (loading or shutting down)"},
    504: {"model": p.ErrorResponse, "description": "a forward pass exceeded engine.batch_timeout_s"},
}


def _service(request: Request) -> ScoringService:
    return request.app.state.service


@router.post("/v1/score", response_model=p.ScoreResponse, responses=ERRORS, tags=["scoring"])
async def score(req: p.ScoreRequest, request: Request) -> p.ScoreResponse:
    """Raw reward, reference, transformed utility and p(good) per model, and the aggregate, per item."""
    return await _service(request).score(req)


@router.post("/v1/utility", response_model=p.UtilityResponse, responses=ERRORS, tags=["scoring"])
async def utility(req: p.UtilityRequest, request: Request) -> p.UtilityResponse:
    """The same utility math on rewards the caller already has (no model call)."""
    return _service(request).utility(req)


def _adapter(request: Request) -> TrainerAdapter:
    adapter: TrainerAdapter | None = request.app.state.adapter
    if adapter is None:
        raise NotReady("models are loading")
    return adapter


@router.post("/get_reward", response_model=GetRewardResponse, responses=ERRORS, tags=["trainers"])
async def get_reward(req: GetRewardRequest, request: Request) -> GetRewardResponse:
    """OpenRLHF's remote reward model (`--remote_rm_url http://host:port/get_reward`)."""
    if req.prompts is not None and len(req.prompts) != len(req.query):
        raise InvalidRequest(f"prompts has {len(req.prompts)} entries but query has {len(req.query)}", "prompts")
    adapter, svc = _adapter(request), _service(request)
    pairs = [adapter.query_item(q, req.prompts[i] if req.prompts is not None else None, f"query.{i}")
             for i, q in enumerate(req.query)]
    scored = await svc.score(score_request(pairs, svc.settings.compat.allow_truncation))
    return get_reward_response(scored.results)


@router.post("/classify", response_model=ClassifyResponse, responses=ERRORS, tags=["trainers"])
async def classify(req: ClassifyRequest, request: Request) -> ClassifyResponse:
    """vLLM's classification API, as verl's reward loop calls it: `probs[-1]` is the utility
    (or, when `model` names a hosted reward model, that model's raw reward)."""
    adapter, svc = _adapter(request), _service(request)
    texts = [req.input] if isinstance(req.input, str) else req.input
    pairs = [adapter.transcript_item(t, "input" if isinstance(req.input, str) else f"input.{i}")
             for i, t in enumerate(texts)]
    model = req.model if req.model in svc.models else None
    scored = await svc.score(score_request(pairs, svc.settings.compat.allow_truncation,
                                           models=[model] if model else None, method="raw" if model else None))
    return classify_response(req, scored.results, model, scored.method)


@router.get("/v1/models", response_model=p.ModelsResponse, tags=["info"])
async def models(request: Request) -> p.ModelsResponse:
    svc = _service(request)
    return p.ModelsResponse(models=svc.model_infos(), default_models=svc.settings.default_model_names,
                            default_method=svc.settings.default_method)  # type: ignore[arg-type]


@router.get("/health", tags=["ops"])
async def health() -> dict[str, str]:
    """The process is alive (liveness)."""
    return {"status": "ok"}


@router.get("/ready", tags=["ops"], responses={503: {"model": p.ErrorResponse}})
async def ready(request: Request) -> JSONResponse:
    """Models loaded and warmed, not shutting down, and no model's queue full (readiness)."""
    svc = _service(request)
    if not svc.ready:
        exc = NotReady("shutting down" if svc.draining else "models are loading")
        return error_response(503, exc.code, exc.message, headers={"Retry-After": "1"})
    full = [name for name, q in svc.engine.queues.items() if q.full]
    if full:  # a load balancer should send new work elsewhere until the queue has room
        return error_response(503, "overloaded", f"queue full: {', '.join(full)}",
                              headers={"Retry-After": str(svc.settings.engine.retry_after_s)})
    return JSONResponse({"status": "ready", "models": list(svc.models)})


@router.get("/metrics", tags=["ops"], include_in_schema=False)
async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type="text/plain; version=0.0.4")
