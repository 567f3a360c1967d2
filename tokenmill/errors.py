"""The one exception hierarchy of tokenmill.

    TokenmillError                  base; carries an OpenAI-style message, param and code
    ├── InvalidRequest              the request itself is wrong (bad field, bad value)
    │   └── ContextLengthExceeded   prompt (+ max_tokens) does not fit the model's window
    │   └── RequestTooLarge         the body is over the size limit
    ├── Unauthorized                missing or wrong API key
    ├── ModelNotFound               the request names a model this server does not serve
    ├── Overloaded                  no capacity now; retry later (carries retry_after seconds)
    ├── DeadlineExceeded            a timeout fired before the generation ended
    ├── ClientGone                  the client left before its request started (nobody to answer)
    └── EngineFailure               the model backend failed while generating
        └── UpstreamFailure         the remote model server (upstream mode) failed or is unreachable

Errors carry no HTTP status: the server maps each class to a status in exactly one place
(`tokenmill.server.errors`), so engines and runners stay free of HTTP.
"""

from __future__ import annotations


class TokenmillError(Exception):
    """Base class; `code` is a short machine-readable reason, `param` the offending field."""

    error_type = "server_error"
    default_code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code

    def __reduce__(self):
        # Keep errors picklable with their keyword fields (they cross process boundaries).
        return (_rebuild_error, (type(self), self.message, self.param, self.code, self.__dict__))


def _rebuild_error(cls, message, param, code, state):
    error = cls.__new__(cls)
    Exception.__init__(error, message)
    error.__dict__.update(state)
    return error


class InvalidRequest(TokenmillError):
    error_type = "invalid_request_error"


class ContextLengthExceeded(InvalidRequest):
    default_code = "context_length_exceeded"


class RequestTooLarge(InvalidRequest):
    default_code = "request_too_large"


class Unauthorized(TokenmillError):
    error_type = "invalid_request_error"
    default_code = "invalid_api_key"


class ModelNotFound(TokenmillError):
    error_type = "invalid_request_error"
    default_code = "model_not_found"


class RetryLater(TokenmillError):
    """A refusal that says when to come back (the `Retry-After` header)."""

    def __init__(self, message: str, *, retry_after: float = 1.0, code: str | None = None):
        super().__init__(message, code=code)
        self.retry_after = retry_after


class Overloaded(RetryLater):
    error_type = "server_overloaded"
    default_code = "overloaded"


class QuotaExceeded(RetryLater):
    """A key over its own quota (429): not an overload, and the server may be idle."""

    error_type = "rate_limit_error"
    default_code = "rate_limit_exceeded"


class DeadlineExceeded(TokenmillError):
    error_type = "timeout_error"
    default_code = "timeout"


class ClientGone(TokenmillError):
    error_type = "client_closed_request"
    default_code = "client_gone"


class EngineFailure(TokenmillError):
    error_type = "server_error"
    default_code = "engine_failure"


class UpstreamFailure(EngineFailure):
    default_code = "upstream_failure"
