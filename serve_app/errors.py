"""Domain errors. Each carries its HTTP status; the ingress maps them in one place."""

from __future__ import annotations


class TryageError(Exception):
    """A request that cannot be served as asked; the message is safe to show a client."""

    status = 400
    type = "invalid_request_error"

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param

    def body(self) -> dict:
        """The one error shape of the HTTP API."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param}}


class BadRequest(TryageError):
    """Malformed or invalid input (400)."""


class UnknownExpert(TryageError):
    """A request names an expert the library does not hold (404)."""

    status = 404
    type = "not_found_error"


class NoExpertAvailable(TryageError):
    """No expert could answer: every attempt failed (503)."""

    status = 503
    type = "service_unavailable_error"


class Overloaded(TryageError):
    """The deployments that could answer are at their queue limit: retry later (503 or 429,
    with Retry-After)."""

    type = "overloaded_error"

    def __init__(self, message: str, status: int = 503, retry_after_s: float | None = 1.0):
        super().__init__(message)
        self.status = status
        self.retry_after_s = retry_after_s
