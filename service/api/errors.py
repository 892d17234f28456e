"""The one table from service errors to HTTP status, and the handlers that use it."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from .. import errors as e
from ..protocol import ErrorBody, ErrorResponse

log = logging.getLogger("logand")

STATUS: dict[type[e.LogandError], int] = {
    e.InvalidRequest: 422,
    e.TooLarge: 413,
    e.Overloaded: 429,
    e.NotReady: 503,
    e.BatchTimeout: 504,
    e.BackendFailure: 500,
    e.NonFiniteScore: 500,
}


def error_response(status: int, code: str, message: str, field: str | None = None,
                   details: list | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    body = ErrorResponse(error=ErrorBody(code=code, message=message, field=field, details=details))
    return JSONResponse(body.model_dump(exclude_none=True), status_code=status, headers=headers)


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


def _field(loc: tuple) -> str:
    """``items.0.prompt`` from pydantic's location, without the union-member tags it adds
    (``str``, ``list[ChatMessage]``, ``function-after[…]``)."""
    parts = [str(x) for x in loc if x != "body" and not (isinstance(x, str) and (
        x in _TYPE_TAGS or "[" in x or "(" in x))]
    return ".".join(parts) or "body"


def _message(msg: str) -> str:
    return msg.removeprefix("Value error, ")


def install(app: FastAPI) -> None:
    @app.exception_handler(e.LogandError)
    async def _logand(request: Request, exc: e.LogandError) -> JSONResponse:
        status = next((s for cls, s in STATUS.items() if isinstance(exc, cls)), 500)
        headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, e.RetryLater) else None
        return error_response(status, exc.code, exc.message, exc.field, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        if errs and errs[0].get("type") == "json_invalid":
            reason = (errs[0].get("ctx") or {}).get("error", "")
            return error_response(400, "bad_request", f"the body is not valid JSON ({reason})".replace(" ()", ""),
                                  "body")
        details = [{"field": _field(tuple(er.get("loc", ()))), "message": _message(er.get("msg", ""))} for er in errs]
        first = details[0] if details else {"field": "body", "message": "invalid request"}
        more = f" (and {len(details) - 1} more)" if len(details) > 1 else ""
        return error_response(422, "invalid_request", f"{first['field']}: {first['message']}{more}",
                              first["field"], details)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed", 413: "too_large", 400: "bad_request"}
        message, field = str(exc.detail), None
        if exc.status_code == 400 and message == "There was an error parsing the body":
            message, field = "the body is not valid JSON (or not UTF-8, or nested too deeply)", "body"
        return error_response(exc.status_code, codes.get(exc.status_code, "http_error"), message, field,
                              headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # A bug, not a bad request: logged with its traceback (never the body), answered as JSON.
        log.error("unhandled %s on %s %s", type(exc).__name__, request.method, request.url.path, exc_info=exc)
        return error_response(500, "internal", f"internal error ({type(exc).__name__}); see the server log")
