"""The one place where errors become HTTP: statuses, error bodies, exception handlers.

Bodies are OpenAI's shape (`{"error": {"message", "type", "param", "code"}}`), except under
Anthropic's Messages API (`/v1/messages...`), whose clients read `{"type": "error", "error":
{"type", "message"}}`. The status is the same either way."""

from __future__ import annotations

import logging
import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tokenmill.errors import (
    ClientGone,
    DeadlineExceeded,
    EngineFailure,
    InvalidRequest,
    ModelNotFound,
    Overloaded,
    QuotaExceeded,
    RequestTooLarge,
    RetryLater,
    TokenmillError,
    Unauthorized,
    UpstreamFailure,
)
from tokenmill.protocol import ErrorDetail, ErrorResponse

log = logging.getLogger(__name__)

_STATUS: dict[type[TokenmillError], int] = {
    RequestTooLarge: 413,
    Unauthorized: 401,
    InvalidRequest: 400,
    ModelNotFound: 404,
    Overloaded: 503,
    QuotaExceeded: 429,
    DeadlineExceeded: 504,
    ClientGone: 499,  # nginx's "client closed request": the answer goes nowhere
    UpstreamFailure: 502,
    EngineFailure: 500,
}


def status_for(error: TokenmillError) -> int:
    for cls in type(error).__mro__:
        if cls in _STATUS:
            return _STATUS[cls]
    return 500


def error_body(error: TokenmillError) -> dict:
    detail = ErrorDetail(message=error.message, type=error.error_type, param=error.param, code=error.code)
    return ErrorResponse(error=detail).model_dump()


ANTHROPIC_PREFIX = "/v1/messages"

# Anthropic's error types, by the class of ours (most specific first, as status_for walks the MRO)
_ANTHROPIC_TYPES: dict[type[TokenmillError], str] = {
    RequestTooLarge: "request_too_large",
    Unauthorized: "authentication_error",
    InvalidRequest: "invalid_request_error",
    ModelNotFound: "not_found_error",
    Overloaded: "overloaded_error",
    QuotaExceeded: "rate_limit_error",
    DeadlineExceeded: "timeout_error",
}


def speaks_anthropic(path: str) -> bool:
    return path == ANTHROPIC_PREFIX or path.startswith(ANTHROPIC_PREFIX + "/")


def anthropic_error_body(error: TokenmillError) -> dict:
    kind = next((_ANTHROPIC_TYPES[cls] for cls in type(error).__mro__ if cls in _ANTHROPIC_TYPES), "api_error")
    return {"type": "error", "error": {"type": kind, "message": error.message}}


def error_body_for(path: str, error: TokenmillError) -> dict:
    """The error's body in the wire format the route at `path` speaks."""
    return anthropic_error_body(error) if speaks_anthropic(path) else error_body(error)


def error_headers(error: TokenmillError) -> dict[str, str]:
    if isinstance(error, RetryLater):
        return {"Retry-After": str(max(1, math.ceil(error.retry_after)))}
    if isinstance(error, Unauthorized):
        return {"WWW-Authenticate": "Bearer"}
    return {}


def error_response(error: TokenmillError, path: str = "") -> JSONResponse:
    return JSONResponse(error_body_for(path, error), status_code=status_for(error), headers=error_headers(error))


def _plain_error(path: str, status: int, message: str, error_type: str, code: str | None = None) -> JSONResponse:
    """An HTTP-level refusal (unknown path, wrong method) or an unexpected failure."""
    if speaks_anthropic(path):
        kind = "not_found_error" if status == 404 else "invalid_request_error" if status < 500 else "api_error"
        return JSONResponse({"type": "error", "error": {"type": kind, "message": message}}, status_code=status)
    detail = ErrorDetail(message=message, type=error_type, code=code)
    return JSONResponse(ErrorResponse(error=detail).model_dump(), status_code=status)


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """A sentence a person understands, and the offending parameter, from pydantic's error list."""
    # the most specific error: a union's members each report one, and the member the value was
    # meant for (a list of blocks, say) reports it deepest, where `str` only says "a valid string"
    first = max(exc.errors(), key=lambda error: len(error.get("loc", ())))
    loc = list(first.get("loc", ()))
    if loc and loc[0] in ("body", "query"):  # where FastAPI read it from: not part of the parameter's name
        loc = loc[1:]
    location = [str(part) for part in loc]
    # pydantic reports union members as extra path parts ('str', 'list[...]'): drop them.
    location = [
        part
        for part in location
        if not any(ch in part for ch in "[]") and part not in ("str", "int", "float", "bool", "list")
    ]
    param = ".".join(location) or None
    kind = first.get("type", "")
    if kind == "json_invalid":
        return "The request body is not valid JSON.", None
    if kind == "missing" and param:
        return f"Missing required parameter: '{param}'.", param
    if kind == "extra_forbidden" and param:
        return f"Unrecognized request argument supplied: '{param}'.", param
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if param:
        return f"Invalid value for '{param}': {message}.", param
    return f"Invalid request: {message}.", None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(TokenmillError)
    async def _tokenmill_error(request: Request, exc: TokenmillError) -> JSONResponse:
        return error_response(exc, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(exc)
        return error_response(InvalidRequest(message, param=param), request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error_type = "invalid_request_error" if exc.status_code < 500 else "server_error"
        response = _plain_error(request.url.path, exc.status_code, str(exc.detail), error_type)
        for name, value in (exc.headers or {}).items():
            response.headers[name] = value
        return response

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return _plain_error(
            request.url.path, 500, "The server had an internal error.", "server_error", "internal_error"
        )
