"""What a call through `tokenmill.client` can end with, besides its answer.

ClientError                 base
├── APIStatusError          the server answered 4xx/5xx (status, its message, Retry-After)
├── StreamError             the server ended a stream with an error event
├── ConnectionFailed        no connection, or it broke before any answer
├── TimedOut                a deadline fired: phase is connect, first_token, between_tokens or total
└── MalformedResponse       the answer was not what the OpenAI API sends
"""

from __future__ import annotations


class ClientError(Exception):
    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class APIStatusError(ClientError):
    def __init__(self, status: int, message: str, *, code: str | None = None, retry_after: float | None = None):
        super().__init__(f"{status}: {message}")
        self.status = status
        self.server_message = message
        self.code = code
        self.retry_after = retry_after


class StreamError(ClientError):
    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        self.code = code


class ConnectionFailed(ClientError):
    pass


class TimedOut(ClientError):
    def __init__(self, phase: str, seconds: float):
        super().__init__(
            f"no {phase.replace('_', ' ')} within {seconds:g} s"
            if phase != "total"
            else f"the call took over {seconds:g} s"
        )
        self.phase = phase
        self.seconds = seconds


class MalformedResponse(ClientError):
    pass
