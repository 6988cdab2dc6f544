"""Every failure as an OpenAI-style JSON error object; every bad request as a 4xx, never a 500.

`{"error": {"message": "...", "type": "invalid_request_error", "param": "max_tokens", "code": null}}`

Request bodies are read and parsed here (size limit, JSON, schema), and anything that goes
wrong while parsing, expected or not, becomes a 400 naming the problem.
"""

from __future__ import annotations

import json
import logging
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import PeftkitError
from .engine import Conflict, UnknownModel
from .security import AccessError

log = logging.getLogger(__name__)

ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
    405: "invalid_request_error", 409: "conflict_error", 413: "invalid_request_error", 415: "invalid_request_error",
    429: "rate_limit_error",
    503: "server_error",
}

M = TypeVar("M", bound=BaseModel)


class ApiError(Exception):
    """An HTTP error with an OpenAI-style body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"), "param": param, "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status)


def status_of(exc: PeftkitError) -> int:
    """The HTTP status of a user mistake reported by the library."""
    for cls, status in ((UnknownModel, 404), (AccessError, 403), (Conflict, 409)):
        if isinstance(exc, cls):
            return status
    return 400


def check_json_content_type(request: Request) -> None:
    """415 unless the body is declared JSON (`application/json`, `...+json`) or not declared at all."""
    declared = request.headers.get("content-type")
    if declared is None:
        return
    media = declared.split(";", 1)[0].strip().lower()
    if media != "application/json" and not (media.startswith("application/") and media.endswith("+json")):
        raise ApiError(415, f"Content-Type {declared[:80]!r} is not supported; send JSON with Content-Type: application/json")


async def read_json(request: Request, limit: int) -> Any:
    """The body as JSON: 415 when declared as something else, 413 above `limit` bytes (checked while
    reading), 400 when it is not JSON."""
    check_json_content_type(request)
    declared = request.headers.get("content-length")
    if declared is not None and not declared.isdigit():
        raise ApiError(400, f"Content-Length {declared[:40]!r} is not a number")
    if declared is not None and int(declared) > limit:
        raise ApiError(413, f"request body is larger than the limit of {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"request body is larger than the limit of {limit} bytes")
    if not body:
        raise ApiError(400, "the request body is empty; send a JSON object")
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, f"the request body is not valid JSON ({str(exc)[:200]})") from None


def parse_body(model: type[M], data: Any) -> M:
    """Validate JSON against a request schema; every problem is listed in one 400 message."""
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ApiError:  # a schema's own refusal, naming its field
        raise
    except ValidationError as exc:
        problems = [_describe(e) for e in exc.errors()[:10]]
        first = exc.errors()[0]["loc"] if exc.errors() else ()
        raise ApiError(400, "invalid request: " + "; ".join(problems), param=".".join(map(str, first)) or None) from None
    except Exception as exc:  # anything else while parsing is still the request's fault
        raise ApiError(400, f"invalid request: {type(exc).__name__}: {str(exc)[:200]}") from None


def _describe(error: Any) -> str:
    where = ".".join(str(part) for part in error.get("loc", ())) or "body"
    message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
    return f"{where}: {message}"


def install_error_handlers(app: FastAPI) -> None:
    """JSON error objects for our errors, library errors, routing errors and anything unexpected."""

    @app.exception_handler(ApiError)
    async def _api(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.code)

    @app.exception_handler(PeftkitError)
    async def _peftkit(_: Request, exc: PeftkitError) -> JSONResponse:
        return error_response(status_of(exc), str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = str(exc.detail)
        if exc.status_code == 404:
            message += f": {request.url.path} is not an endpoint; see /openapi.json for the API"
        elif exc.status_code == 405:
            allowed = (exc.headers or {}).get("Allow", "")
            message += f": {request.method} {request.url.path}; use {allowed or 'another method'}"
        return JSONResponse(error_body(exc.status_code, message), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(400, "invalid request: " + "; ".join(_describe(e) for e in exc.errors()[:10]))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(500, f"internal server error ({type(exc).__name__}); the request was valid, this is a bug")
