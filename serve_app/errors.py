"""Domain errors. Each carries its HTTP status and error type; serve_app.api maps them to HTTP
answers in one place, in the one error shape (serve_app.protocol.ErrorResponse)."""

from __future__ import annotations

from serve_app.protocol import ErrorDetail, ErrorResponse


class TryageError(Exception):
    """A request that cannot be served as asked; the message is safe to show a client."""

    status = 400
    type = "invalid_request_error"
    code: str | None = "invalid_request"

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param

    def body(self) -> ErrorResponse:
        """The one error shape of the HTTP API."""
        return error_body(self.message, self.type, self.param, self.code)


def error_body(
    message: str, type_: str, param: str | None = None, code: str | None = None
) -> ErrorResponse:
    """`{"error": {"message", "type", "param", "code"}}`."""
    return ErrorResponse(error=ErrorDetail(message=message, type=type_, param=param, code=code))


class BadRequest(TryageError):
    """Malformed or invalid input (400)."""


class UnknownExpert(TryageError):
    """A request names an expert the library does not hold (404)."""

    status = 404
    type = "not_found_error"
    code = "model_not_found"


class NoExpertAvailable(TryageError):
    """No expert could answer: every attempt failed, or the deadline passed (503, with
    Retry-After)."""

    status = 503
    type = "service_unavailable_error"
    code = "no_expert_available"
    retry_after_s: float | None = 1.0


class Overloaded(TryageError):
    """The deployments that could answer are at their queue limit: retry later (503 or 429,
    with Retry-After)."""

    type = "overloaded_error"
    code = "overloaded"

    def __init__(self, message: str, status: int = 503, retry_after_s: float | None = 1.0):
        super().__init__(message)
        self.status = status
        self.retry_after_s = retry_after_s
