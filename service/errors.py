"""Errors as values: each carries a stable ``code``, a message a user can act on, and the field.

No HTTP here; ``service.api.errors`` maps each class to a status code in one table.
"""

from __future__ import annotations


class LogandError(Exception):
    code = "error"

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class InvalidRequest(LogandError):
    """The request cannot be served as sent (unknown model, bad weights, text too long …)."""

    code = "invalid_request"


class TooLarge(LogandError):
    """Over a configured size limit (items per request, characters per text, body bytes)."""

    code = "too_large"


class RetryLater(LogandError):
    """Temporarily unable to serve: try again after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Overloaded(RetryLater):
    """A queue is full."""

    code = "overloaded"


class NotReady(RetryLater):
    """Models are still loading, or the service is shutting down."""

    code = "not_ready"


class BatchTimeout(LogandError):
    """A forward pass ran past ``engine.batch_timeout_s``; its items fail, the next batch runs."""

    code = "batch_timeout"


class BackendFailure(LogandError):
    """The model raised while scoring a batch; exactly that batch's items fail."""

    code = "backend_failure"


class NonFiniteScore(LogandError):
    """A model returned NaN or ±inf for an item: an error, never a number."""

    code = "non_finite_score"
