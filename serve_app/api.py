"""The ingress's FastAPI app. Domain errors (serve_app.errors) and the framework's own become
HTTP answers here and nowhere else, all in the one error shape (serve_app.protocol)."""

from __future__ import annotations

import logging
import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from serve_app.errors import Overloaded, TryageError, error_body
from serve_app.protocol import ErrorResponse

logger = logging.getLogger("ray.serve")

#: Documented in /openapi.json for every endpoint.
ERROR_RESPONSES = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in (
        (400, "Bad request"),
        (404, "Unknown expert"),
        (503, "No expert can serve now"),
    )
}


def error_response(
    status: int,
    message: str,
    type_: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """The one error shape with an HTTP status."""
    body = error_body(message, type_, param, code).model_dump()
    return JSONResponse(body, status_code=status, headers=headers)


def create_api() -> FastAPI:
    """The ingress's FastAPI app; every error, ours or the framework's, in one shape."""
    api = FastAPI(
        title="tryage",
        description="Routes each prompt to the best expert model.",
        responses=ERROR_RESPONSES,
    )

    @api.exception_handler(TryageError)
    async def _tryage_error(_: Request, err: TryageError) -> JSONResponse:
        headers = {}
        if isinstance(err, Overloaded) and err.retry_after_s is not None:
            headers["Retry-After"] = str(max(0, math.ceil(err.retry_after_s)))
        return error_response(err.status, err.message, err.type, err.param, err.code, headers)

    @api.exception_handler(RequestValidationError)
    async def _invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0]
        if first.get("type") == "json_invalid":
            return error_response(
                400, "malformed JSON body", "invalid_request_error", code="invalid_json"
            )
        loc = [str(p) for p in first.get("loc", ())][1:]  # drop "body" / "query"
        where = ".".join(loc) or None
        message = f"{where}: {first.get('msg')}" if where else str(first.get("msg"))
        return error_response(400, message, "invalid_request_error", where, "invalid_value")

    @api.exception_handler(HTTPException)
    async def _http(_: Request, err: HTTPException) -> JSONResponse:
        return error_response(err.status_code, str(err.detail), "invalid_request_error")

    @api.exception_handler(Exception)
    async def _internal(_: Request, err: Exception) -> JSONResponse:
        logger.exception("internal error", exc_info=err)
        return error_response(500, "internal error; see the server logs", "internal_error")

    return api
