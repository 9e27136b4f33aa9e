"""The ingress's FastAPI app. Domain errors (serve_app.errors) and the framework's own become
HTTP answers here and nowhere else, all in the one error shape (serve_app.protocol)."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from serve_app.errors import TryageError, error_body
from serve_app.protocol import ErrorResponse

logger = logging.getLogger("ray.serve")

#: Documented in /openapi.json for every endpoint.
ERROR_RESPONSES = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in (
        (400, "Bad request"),
        (401, "No valid API key (where TRYAGE_API_KEYS is set)"),
        (404, "Unknown expert, model or path"),
        (405, "Method not allowed on this path"),
        (413, "Request body too large"),
        (503, "No expert can serve now"),
    )
}


#: The environment variable with the accepted API keys (comma-separated).
API_KEYS_ENV = "TRYAGE_API_KEYS"
#: Where the builder hands the keys to the ingress replicas: their SHA-256 digests (hex,
#: comma-separated). Serve's REST API shows every deployment's runtime environment, so the
#: keys themselves never go there.
API_KEY_DIGESTS_ENV = "TRYAGE_API_KEY_DIGESTS"


def key_digest(key: str) -> str:
    """An API key's SHA-256, hex: what the ingress keeps and compares."""
    return hashlib.sha256(key.encode()).hexdigest()


#: Paths open without a key: the load balancer's health check.
OPEN_PATHS = ("/healthz",)


def _safe(text: str | None) -> str | None:
    """Text that can be encoded: a lone surrogate echoed from a request is escaped."""
    if text is None:
        return None
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_json(
    message: str, type_: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """The one error body, as JSON-ready data whose every string can be encoded."""
    return error_body(_safe(message), type_, _safe(param), code).model_dump()


def error_response(
    status: int,
    message: str,
    type_: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """The one error shape with an HTTP status."""
    return JSONResponse(
        error_json(message, type_, param, code), status_code=status, headers=headers
    )


@dataclass
class Guard:
    """What the ingress checks before FastAPI reads a request: body size, API key."""

    max_body_bytes: int = 1 << 20
    key_digests: list[str] = field(default_factory=list)  # key_digest of each accepted key

    @staticmethod
    def keys_from(value: str | None) -> list[str]:
        """The keys of a TRYAGE_API_KEYS value: comma-separated, blanks ignored."""
        return [k.strip() for k in (value or "").split(",") if k.strip()]

    @classmethod
    def digests_from(cls, environ: Mapping[str, str]) -> list[str]:
        """The accepted keys' digests: of TRYAGE_API_KEYS (set in the Ray processes'
        environment) and TRYAGE_API_KEY_DIGESTS (from the builder)."""
        digests = [key_digest(k) for k in cls.keys_from(environ.get(API_KEYS_ENV))]
        digests += [d.lower() for d in cls.keys_from(environ.get(API_KEY_DIGESTS_ENV))]
        return list(dict.fromkeys(digests))  # a local Ray's replicas see both: once each

    def authorised(self, headers: dict[bytes, bytes]) -> bool:
        """Whether the Authorization header carries an accepted key (constant-time compare)."""
        given = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, key = given.partition(" ")
        if scheme.lower() != "bearer" or not key:
            return False
        digest = key_digest(key.strip()).encode()
        found = False
        for accepted in self.key_digests:  # no early exit: the time does not tell which key
            found |= hmac.compare_digest(digest, accepted.encode())
        return found


class _TooLarge(Exception):
    pass


class GuardMiddleware:
    """ASGI middleware applying the app's `state.guard`: 401 without a valid key where keys
    are set, 413 for a body over the limit (by Content-Length at once, else while it streams)."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        guard: Guard = getattr(scope["app"].state, "guard", None) or Guard()
        headers = dict(scope.get("headers") or [])
        path, root = scope["path"], scope.get("root_path") or ""
        path = path[len(root) :] if root and path.startswith(root) else path  # under a prefix
        telemetry = getattr(scope["app"].state, "telemetry", None)

        def count(reason: str) -> None:  # a refused request, in the ingress's metrics
            if telemetry is not None:
                telemetry.rejected(path, reason)

        if guard.key_digests and path not in OPEN_PATHS and not guard.authorised(headers):
            count("invalid_api_key")
            message = "a valid API key is needed: send the header 'Authorization: Bearer <key>'"
            return await _send_error(
                send,
                401,
                message,
                "authentication_error",
                "invalid_api_key",
                [(b"www-authenticate", b"Bearer")],
            )
        limit = guard.max_body_bytes
        length = headers.get(b"content-length", b"").decode("latin-1")
        if length.isdigit() and int(length) > limit:
            count("body_too_large")
            return await _too_large(send, limit)
        seen = 0
        over = False  # the body passed the limit while the app read it
        replaced = False  # the app's answer was replaced by the 413

        async def counted() -> dict:
            nonlocal seen, over
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    over = True
                    raise _TooLarge
            return message

        async def checked(message: dict) -> None:
            # The app may catch _TooLarge itself (FastAPI makes it a 400 "error parsing the
            # body"): whatever it answers then, the client gets the 413.
            nonlocal replaced
            if over:
                if not replaced:
                    replaced = True
                    await _too_large(send, limit)
                return
            await send(message)

        try:
            await self.app(scope, counted, checked)
        except _TooLarge:
            if not replaced:
                await _too_large(send, limit)
        if over:
            count("body_too_large")


async def _too_large(send: Any, limit: int) -> None:
    message = f"the request body is over the limit of {limit} bytes"
    await _send_error(send, 413, message, "invalid_request_error", "body_too_large")


async def _send_error(
    send: Any,
    status: int,
    message: str,
    type_: str,
    code: str,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    body = json.dumps(error_json(message, type_, None, code)).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": head + (headers or [])})
    await send({"type": "http.response.body", "body": body})


#: FastAPI's and Starlette's own HTTP errors, known by their status and default detail, in
#: the error shape: (status, detail) -> (type, code, message).
HTTP_ERRORS = {
    (400, "There was an error parsing the body"): (
        "invalid_request_error",
        "invalid_body",
        "the body could not be read as JSON: send it as UTF-8, uncompressed, and not nested "
        "hundreds of levels deep",
    ),
    (404, "Not Found"): ("not_found_error", "not_found", "no endpoint {path}; the API: /docs"),
    (405, "Method Not Allowed"): (
        "invalid_request_error",
        "method_not_allowed",
        "{path} does not take {method}; it takes {allow}",
    ),
}


EMPTY_BODY = "the body is empty: send a JSON object, with the header content-type: application/json"


def _body_problem(request: Request, error: dict) -> str:
    """What is wrong with a body that is not a JSON object, in words: none sent, sent without a
    JSON content type (curl -d sends a form's), or JSON that is not an object."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if error.get("type") == "missing":
        return EMPTY_BODY
    if kind != "application/json" and not kind.endswith("+json"):
        return (
            "send the body as a JSON object with the header content-type: application/json "
            f"(it came as {kind or 'no content type'})"
        )
    value = error.get("input")
    kinds = {
        list: "an array",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
    }
    return f"the body must be a JSON object, not {kinds.get(type(value), 'null')}"


def create_api() -> FastAPI:
    """The ingress's FastAPI app; every error, ours or the framework's, in one shape."""
    api = FastAPI(
        title="tryage",
        description="Routes each prompt to the best expert model.",
        responses=ERROR_RESPONSES,
    )
    api.add_middleware(GuardMiddleware)

    def _count(request: Request, reason: str) -> None:
        """A refused request, in the ingress's metrics (serve_app.telemetry)."""
        telemetry = getattr(request.app.state, "telemetry", None)
        if telemetry is not None:
            telemetry.rejected(request.url.path, reason)

    @api.exception_handler(TryageError)
    async def _tryage_error(request: Request, err: TryageError) -> JSONResponse:
        _count(request, err.code or err.type)
        headers = {}
        retry_after = getattr(err, "retry_after_s", None)
        if retry_after is not None:
            headers["Retry-After"] = str(max(0, math.ceil(retry_after)))
        return error_response(err.status, err.message, err.type, err.param, err.code, headers)

    @api.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0]
        malformed = first.get("type") == "json_invalid"
        whole = tuple(first.get("loc", ())) == ("body",)
        not_an_object = whole and first.get("type") in (
            "missing",
            "model_attributes_type",
            "dict_type",
        )
        _count(
            request,
            "invalid_json" if malformed else "invalid_body" if not_an_object else "invalid_value",
        )
        if malformed:
            blank = isinstance(err.body, str | bytes) and not err.body.strip()
            message = EMPTY_BODY if blank else "malformed JSON body"
            return error_response(400, message, "invalid_request_error", code="invalid_json")
        if not_an_object:
            return error_response(
                400, _body_problem(request, first), "invalid_request_error", code="invalid_body"
            )
        loc = [str(p) for p in first.get("loc", ())][1:]  # drop "body" / "query"
        where = ".".join(loc) or None
        msg = str(first.get("msg"))
        error = (first.get("ctx") or {}).get("error")
        if isinstance(error, ValueError):  # our own validators' words, without pydantic's prefix
            msg = str(error)
            where = getattr(error, "where", where)  # checked on the whole body, names the field
            if getattr(error, "field", None):  # a model's check, about one of its fields
                where = f"{where}.{error.field}" if where else error.field
        message = f"{where}: {msg}" if where else msg
        return error_response(400, message, "invalid_request_error", where, "invalid_value")

    @api.exception_handler(HTTPException)
    async def _http(request: Request, err: HTTPException) -> JSONResponse:
        # FastAPI's own: no such path or method, or a body it could not read at all (not
        # UTF-8, compressed, nested past the JSON parser's depth). Any other keeps its detail.
        headers = dict(err.headers or {})
        known = HTTP_ERRORS.get((err.status_code, str(err.detail)))
        if known is None:
            return error_response(
                err.status_code, str(err.detail), "invalid_request_error", headers=headers
            )
        type_, code, template = known
        message = template.format(
            method=request.method,
            path=request.url.path,
            allow={k.lower(): v for k, v in headers.items()}.get("allow", ""),
        )
        return error_response(err.status_code, message, type_, code=code, headers=headers)

    @api.exception_handler(Exception)
    async def _internal(_: Request, err: Exception) -> JSONResponse:
        logger.exception("internal error", exc_info=err)
        return error_response(500, "internal error; see the server logs", "internal_error")

    return api
