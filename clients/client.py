"""HTTP clients of the logand service: :class:`RewardClient` (sync) and :class:`AsyncRewardClient`.

    with RewardClient("http://127.0.0.1:8000") as rc:
        results = rc.score([("\\n\\nHuman: hi\\n\\nAssistant:", "Hello!")])
        results[0].utility, results[0].rewards["helpful"]

Behaviour:

* default timeouts on (connect 5 s, read 120 s);
* retries with exponential backoff (honouring ``Retry-After``) on 429, 503 and connection
  errors — never on other statuses, so bad input fails at once;
* large requests are split into chunks of ``chunk_size`` items and reassembled in order;
* ``api_key`` is sent as ``Authorization: Bearer``; ``transport`` is injectable (tests).

Errors, all raised ``from`` the underlying exception:

``RewardServiceError``            base class
├── ``ServiceUnavailable``        still 429/503/connection errors after every retry
└── ``RequestRejected``           any other 4xx/5xx; ``.status``, ``.code``, ``.field``, ``.message``
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from typing import Any, Iterator, Sequence

import httpx

from service.formatting import Prompt
from service.protocol import ScoreResponse, ScoreResult, UtilityResponse

RETRY_STATUSES = frozenset({429, 503})
DEFAULT_TIMEOUT = httpx.Timeout(120.0, connect=5.0)


class RewardServiceError(Exception):
    """Base of every error these clients raise."""


class ServiceUnavailable(RewardServiceError):
    """The service stayed overloaded, not ready or unreachable through every retry."""


class RequestRejected(RewardServiceError):
    """The service answered with an error that retrying cannot fix."""

    def __init__(self, status: int, message: str, code: str | None = None, field: str | None = None) -> None:
        super().__init__(f"{status} {code or ''}: {message}" + (f" (field {field})" if field else ""))
        self.status = status
        self.message = message
        self.code = code
        self.field = field


def _rejected(response: httpx.Response) -> RequestRejected:
    try:
        err = response.json().get("error", {})
    except ValueError:
        err = {}
    return RequestRejected(response.status_code, err.get("message") or response.text[:500],
                           err.get("code"), err.get("field"))


def _items(pairs: Sequence[tuple[Prompt, str]]) -> list[dict[str, Any]]:
    return [{"prompt": p if isinstance(p, str) else list(p), "response": r} for p, r in pairs]


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


class _Base:
    def __init__(self, base_url: str, api_key: str | None, max_retries: int, backoff_s: float,
                 max_backoff_s: float, chunk_size: int) -> None:
        self.base_url = base_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.chunk_size = chunk_size

    def _delay(self, attempt: int, response: httpx.Response | None) -> float:
        if response is not None:
            retry_after = response.headers.get("retry-after", "")
            if retry_after.replace(".", "", 1).isdigit():
                return min(float(retry_after), self.max_backoff_s)
        return min(self.backoff_s * 2**attempt, self.max_backoff_s) * (0.5 + random.random() / 2)

    def _outcome(self, response: httpx.Response | None, error: Exception | None) -> tuple[bool, Any, Exception]:
        """(done, JSON body, error to remember): raises at once what retrying cannot fix."""
        if response is None:
            return False, None, error or RuntimeError("no response")
        if response.status_code < 400:
            return True, response.json(), RuntimeError("unreachable")
        if response.status_code not in RETRY_STATUSES:
            raise _rejected(response)
        return False, None, _rejected(response)

    def _give_up(self, method: str, path: str, last: Exception) -> ServiceUnavailable:
        return ServiceUnavailable(f"{method} {path}: gave up after {self.max_retries + 1} tries: {last}")

    def _score_body(self, pairs: Sequence[tuple[Prompt, str]], models: Sequence[str] | None, method: str | None,
                    weights: dict[str, float] | None, references: dict[str, Any] | None,
                    allow_truncation: bool) -> dict[str, Any]:
        body: dict[str, Any] = {"items": _items(pairs), "allow_truncation": allow_truncation}
        for key, value in (("models", list(models) if models else None), ("method", method),
                           ("weights", weights), ("references", references)):
            if value is not None:
                body[key] = value
        return body

    @staticmethod
    def _utility_body(rewards: Sequence[dict[str, float]], references: Sequence[dict[str, float]] | None,
                      method: str | None, weights: dict[str, float] | None) -> dict[str, Any]:
        body: dict[str, Any] = {"rewards": list(rewards)}
        if references is not None:
            body["references"] = list(references)
        if method:
            body["method"] = method
        if weights:
            body["weights"] = weights
        return body


class RewardClient(_Base):
    """Synchronous client; use as a context manager or call :meth:`close`."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None, *,
                 timeout: httpx.Timeout | float = DEFAULT_TIMEOUT, max_retries: int = 6, backoff_s: float = 0.5,
                 max_backoff_s: float = 30.0, chunk_size: int = 256,
                 transport: httpx.BaseTransport | None = None) -> None:
        super().__init__(base_url, api_key, max_retries, backoff_s, max_backoff_s, chunk_size)
        self._http = httpx.Client(base_url=self.base_url, headers=self.headers, timeout=timeout, transport=transport)

    def __enter__(self) -> "RewardClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def request(self, method: str, path: str, json: Any = None) -> Any:
        """One call with retries on 429/503/connection errors; the decoded JSON body."""
        last: Exception = RuntimeError("no attempt")
        for attempt in range(self.max_retries + 1):
            response, error = None, None
            try:
                response = self._http.request(method, path, json=json)
            except httpx.TransportError as exc:
                error = exc
            done, body, last = self._outcome(response, error)
            if done:
                return body
            if attempt < self.max_retries:
                time.sleep(self._delay(attempt, response))
        raise self._give_up(method, path, last) from last

    def score(self, pairs: Sequence[tuple[Prompt, str]], models: Sequence[str] | None = None,
              method: str | None = None, weights: dict[str, float] | None = None,
              references: dict[str, Any] | None = None, allow_truncation: bool = False) -> list[ScoreResult]:
        """Score (prompt, response) pairs; results in input order."""
        out: list[ScoreResult] = []
        for part in _chunks(len(pairs), self.chunk_size):
            refs = _slice_references(references, part)
            body = self._score_body(pairs[part], models, method, weights, refs, allow_truncation)
            out.extend(ScoreResponse.model_validate(self.request("POST", "/v1/score", body)).results)
        return out

    def utility(self, rewards: Sequence[dict[str, float]], references: Sequence[dict[str, float]] | None = None,
                method: str | None = None, weights: dict[str, float] | None = None) -> UtilityResponse:
        """Transform and combine rewards already computed (no model call)."""
        body = self._utility_body(rewards, references, method, weights)
        return UtilityResponse.model_validate(self.request("POST", "/v1/utility", body))

    def models(self) -> dict[str, Any]:
        return dict(self.request("GET", "/v1/models"))

    def ready(self) -> bool:
        try:
            return self._http.get("/ready").status_code == 200
        except httpx.TransportError:
            return False


class AsyncRewardClient(_Base):
    """Asynchronous twin of :class:`RewardClient`; chunks of one call are sent concurrently."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None, *,
                 timeout: httpx.Timeout | float = DEFAULT_TIMEOUT, max_retries: int = 6, backoff_s: float = 0.5,
                 max_backoff_s: float = 30.0, chunk_size: int = 256,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        super().__init__(base_url, api_key, max_retries, backoff_s, max_backoff_s, chunk_size)
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=self.headers, timeout=timeout,
                                       transport=transport)

    async def __aenter__(self) -> "AsyncRewardClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def request(self, method: str, path: str, json: Any = None) -> Any:
        last: Exception = RuntimeError("no attempt")
        for attempt in range(self.max_retries + 1):
            response, error = None, None
            try:
                response = await self._http.request(method, path, json=json)
            except httpx.TransportError as exc:
                error = exc
            done, body, last = self._outcome(response, error)
            if done:
                return body
            if attempt < self.max_retries:
                await asyncio.sleep(self._delay(attempt, response))
        raise self._give_up(method, path, last) from last

    async def score(self, pairs: Sequence[tuple[Prompt, str]], models: Sequence[str] | None = None,
                    method: str | None = None, weights: dict[str, float] | None = None,
                    references: dict[str, Any] | None = None, allow_truncation: bool = False) -> list[ScoreResult]:
        parts = list(_chunks(len(pairs), self.chunk_size))
        bodies = [self._score_body(pairs[p], models, method, weights, _slice_references(references, p),
                                   allow_truncation) for p in parts]
        answers = await asyncio.gather(*(self.request("POST", "/v1/score", b) for b in bodies))
        return [r for a in answers for r in ScoreResponse.model_validate(a).results]

    async def utility(self, rewards: Sequence[dict[str, float]], references: Sequence[dict[str, float]] | None = None,
                      method: str | None = None, weights: dict[str, float] | None = None) -> UtilityResponse:
        body = self._utility_body(rewards, references, method, weights)
        return UtilityResponse.model_validate(await self.request("POST", "/v1/utility", body))

    async def models(self) -> dict[str, Any]:
        return dict(await self.request("GET", "/v1/models"))

    async def ready(self) -> bool:
        try:
            return (await self._http.get("/ready")).status_code == 200
        except httpx.TransportError:
            return False


def _slice_references(references: dict[str, Any] | None, part: slice) -> dict[str, Any] | None:
    """Per-item reference values follow their items into each chunk."""
    if not references:
        return references
    out: dict[str, Any] = {}
    for name, ref in references.items():
        if isinstance(ref, dict) and ref.get("values") is not None:
            out[name] = {"values": list(ref["values"])[part]}
        else:
            out[name] = ref
    return out


_env_clients: dict[tuple[str, str | None], RewardClient] = {}


def client_from_env() -> RewardClient:
    """The process's client for trainer-side hooks (verl, OpenRLHF reward functions), one per
    ``LOGAND_URL`` (default ``http://127.0.0.1:8000``) and ``LOGAND_API_KEY``; 10 retries."""
    key = (os.environ.get("LOGAND_URL", "http://127.0.0.1:8000"), os.environ.get("LOGAND_API_KEY") or None)
    if key not in _env_clients:
        _env_clients[key] = RewardClient(key[0], api_key=key[1], max_retries=10)
    return _env_clients[key]
