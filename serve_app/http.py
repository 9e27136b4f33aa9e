"""HTTP plumbing of the ingress: the FastAPI app with tryage's one error shape, and OpenAI's
response body. Domain errors become HTTP answers here and nowhere else."""

from __future__ import annotations

import logging
import math
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from serve_app.errors import Overloaded, TryageError

logger = logging.getLogger("ray.serve")


def error_response(status: int, message: str, type_: str, param: str | None = None) -> JSONResponse:
    """`{"error": {"message", "type", "param"}}` with an HTTP status."""
    body = {"error": {"message": message, "type": type_, "param": param}}
    return JSONResponse(body, status_code=status)


def create_api() -> FastAPI:
    """The ingress's FastAPI app; every error, ours or the framework's, in one shape."""
    api = FastAPI(title="tryage", description="Routes each prompt to the best expert model.")

    @api.exception_handler(TryageError)
    async def _tryage_error(_: Request, err: TryageError) -> JSONResponse:
        headers = {}
        if isinstance(err, Overloaded) and err.retry_after_s is not None:
            headers["Retry-After"] = str(max(0, math.ceil(err.retry_after_s)))
        return JSONResponse(err.body(), status_code=err.status, headers=headers)

    @api.exception_handler(RequestValidationError)
    async def _invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0]
        if first.get("type") == "json_invalid":
            return error_response(400, "malformed JSON body", "invalid_request_error")
        loc = [str(p) for p in first.get("loc", ())][1:]  # drop "body" / "query"
        where = ".".join(loc) or None
        message = f"{where}: {first.get('msg')}" if where else str(first.get("msg"))
        return error_response(400, message, "invalid_request_error", where)

    @api.exception_handler(HTTPException)
    async def _http(_: Request, err: HTTPException) -> JSONResponse:
        return error_response(err.status_code, str(err.detail), "invalid_request_error")

    @api.exception_handler(Exception)
    async def _internal(_: Request, err: Exception) -> JSONResponse:
        logger.exception("internal error", exc_info=err)
        return error_response(500, "internal error; see the server logs", "internal_error")

    return api


def openai_response(kind: str, prefix: str, expert: str, choice: dict, gen: dict) -> JSONResponse:
    """An OpenAI response body, `model` set to the expert that answered."""
    usage = {
        "prompt_tokens": gen["prompt_tokens"],
        "completion_tokens": gen["completion_tokens"],
        "total_tokens": gen["prompt_tokens"] + gen["completion_tokens"],
    }
    body = {
        "id": f"{prefix}-{uuid.uuid4().hex}",
        "object": kind,
        "created": int(time.time()),
        "model": expert,
        "choices": [{**choice, "finish_reason": gen["finish_reason"]}],
        "usage": usage,
    }
    return JSONResponse(body, headers={"x-tryage-expert": expert})
