"""Pure ASGI middleware: API-key check and request-body size limit, before any parsing."""

from __future__ import annotations

import hmac
import json
from typing import Any

from starlette.exceptions import HTTPException

from ..protocol import ErrorBody, ErrorResponse

OPEN_PATHS = frozenset({"/health", "/metrics"})


async def send_error(send: Any, status: int, code: str, message: str, headers: list | None = None) -> None:
    body = json.dumps(ErrorResponse(error=ErrorBody(code=code, message=message)).model_dump(exclude_none=True)).encode()
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())] + (headers or [])
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": body})


class ResponseTracker:
    """An ASGI ``send`` that remembers whether the response has started (``started``)."""

    def __init__(self, send: Any) -> None:
        self._send = send
        self.started = False

    async def __call__(self, message: dict) -> None:
        if message["type"] == "http.response.start":
            self.started = True
        await self._send(message)


class _BodyTooLarge(HTTPException):
    """Raised from ``receive``: FastAPI re-raises HTTPExceptions met while reading the body."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body is over the limit of {limit} bytes")


class GuardMiddleware:
    """Rejects requests without the API key (401) and bodies over ``max_body_bytes`` (413).

    The key is compared in constant time and never logged.  ``/health`` and ``/metrics`` stay
    open so probes and scrapers need no secret.
    """

    def __init__(self, app: Any, api_key: str | None, max_body_bytes: int) -> None:
        self.app = app
        self._key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        if self._key is not None and scope.get("path") not in OPEN_PATHS:
            auth = headers.get(b"authorization", b"")
            scheme, _, token = auth.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self._key):
                await send_error(send, 401, "unauthorized",
                                 "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                 [(b"www-authenticate", b"Bearer")])
                return
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            await send_error(send, 413, "too_large",
                             f"request body is {int(length)} bytes, over the limit of {self.max_body_bytes}")
            return
        seen = 0
        limit = self.max_body_bytes

        async def guarded_receive() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _BodyTooLarge(limit)
            return message

        tracker = ResponseTracker(send)
        try:
            await self.app(scope, guarded_receive, tracker)
        except _BodyTooLarge as exc:
            if not tracker.started:
                await send_error(send, 413, "too_large", str(exc.detail))
