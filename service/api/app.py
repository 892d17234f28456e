"""The FastAPI application, built by ``create_app(settings)``: nothing happens at import time."""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request, Response
from fastapi.openapi.utils import get_openapi

from .. import __version__
from ..compat import TrainerAdapter
from ..config import Settings
from ..scoring import ScoringService
from . import errors, routes
from .metrics import Metrics
from .middleware import GuardMiddleware

log = logging.getLogger("logand")
access = logging.getLogger("logand.access")
OPS_PATHS = frozenset({"/health", "/ready", "/metrics"})
_RID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def request_id(given: str | None) -> str:
    """The caller's X-Request-ID when it is a plain token, else a fresh one."""
    return given if given and _RID.fullmatch(given) else uuid.uuid4().hex


def _hosted_names(schema: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """Narrow the generated OpenAPI to this server: model names in requests are the hosted ones
    (an enum in ``models``, the allowed keys of ``weights`` and ``references``)."""

    def variants(prop: dict[str, Any]) -> list[dict[str, Any]]:
        return [prop, *prop.get("anyOf", [])]

    request = schema.get("components", {}).get("schemas", {}).get("ScoreRequest", {}).get("properties", {})
    for v in variants(request.get("models", {})):
        if v.get("type") == "array":
            v["items"] = {**v.get("items", {}), "enum": list(names)}
            v["uniqueItems"] = True
    for key in ("weights", "references"):
        for v in variants(request.get(key, {})):
            if v.get("type") == "object":
                v["propertyNames"] = {"enum": list(names)}
    return schema


def create_app(settings: Settings) -> FastAPI:
    metrics = Metrics()
    service = ScoringService(settings, observer=metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.adapter = await asyncio.to_thread(TrainerAdapter.build, settings.compat, settings.base_dir)
        await service.start()
        metrics.ready.set(1)
        log.info("ready: %s", ", ".join(service.models))
        try:
            yield
        finally:
            metrics.ready.set(0)
            await service.stop(drain=True)

    app = FastAPI(
        title="logand",
        version=__version__,
        description="Reward scoring with transformed (log σ(r − r_ref)) and AND-aggregated utilities.",
        lifespan=lifespan,
    )
    app.state.service = service
    app.state.metrics = metrics
    app.state.settings = settings
    app.state.adapter = None  # built at start-up (may load the policy tokenizer)
    errors.install(app)
    app.include_router(routes.router)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            app.openapi_schema = _hosted_names(schema, [m.name for m in settings.models])
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    app.state.inflight = 0  # requests inside the app now (probes and scrapes not counted)

    @app.middleware("http")
    async def observe(request: Request, call_next):  # type: ignore[no-untyped-def]
        started = time.perf_counter()
        rid = request_id(request.headers.get("x-request-id"))
        path = request.url.path
        if path in OPS_PATHS:
            response: Response = await call_next(request)
        elif service.draining:
            # Shutting down: new work is refused at the door; what was accepted finishes.
            response = errors.error_response(503, "not_ready", "the server is shutting down; retry elsewhere",
                                             headers={"Retry-After": str(settings.engine.retry_after_s),
                                                      "Connection": "close"})
        else:
            app.state.inflight += 1
            try:
                response = await call_next(request)
            finally:
                app.state.inflight -= 1
        route = request.scope.get("route")
        name = getattr(route, "path", "unmatched")
        elapsed = time.perf_counter() - started
        metrics.requests.labels(name, str(response.status_code)).inc()
        metrics.request_seconds.labels(name).observe(elapsed)
        response.headers["X-Request-ID"] = rid
        if path not in OPS_PATHS:  # one line per request: never the body
            access.info("%s %s %s %d %.1fms", rid, request.method, path, response.status_code, elapsed * 1000)
        return response

    if settings.server.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=settings.server.cors_origins,
                           allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(GuardMiddleware, api_key=settings.auth.resolved_key(),
                       max_body_bytes=settings.limits.max_body_bytes)
    return app
