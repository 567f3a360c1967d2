"""`tokenmill.client`: call any OpenAI-compatible server well -- pooled, with split timeouts,
backoff with full jitter, a retry budget, and no retry once a stream has delivered a token."""

from tokenmill.client.core import Completion, LLMClient, StreamEnd, StreamEvent, TextChunk, Usage
from tokenmill.client.errors import (
    APIStatusError,
    ClientError,
    ConnectionFailed,
    MalformedResponse,
    StreamError,
    TimedOut,
)
from tokenmill.client.policy import RetryBudget, RetryPolicy, Timeouts
from tokenmill.client.sync import SyncLLMClient

__all__ = [
    "APIStatusError",
    "ClientError",
    "Completion",
    "ConnectionFailed",
    "LLMClient",
    "MalformedResponse",
    "RetryBudget",
    "RetryPolicy",
    "StreamEnd",
    "StreamError",
    "StreamEvent",
    "SyncLLMClient",
    "TextChunk",
    "TimedOut",
    "Timeouts",
    "Usage",
]
