"""How long to wait for what, and when to try again: plain data and arithmetic, no I/O."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Split the way LLM calls need them.

    A long, healthy stream is never cut by `total` unless you set one; a stalled one is cut by
    `between_tokens`. A non-streamed answer arrives whole at the end, so only `connect` and
    `total` (default `non_streamed_total`) apply to it.
    """

    connect: float = 5.0
    first_token: float = 60.0  # from sending the request to the first token (includes queueing)
    between_tokens: float = 30.0
    total: float | None = None
    non_streamed_total: float = 600.0


@dataclass(slots=True)
class RetryBudget:
    """Retries may add at most `ratio` extra load: every call earns `ratio` of a retry, every retry
    spends one; `reserve` retries are available up front. A failing upstream therefore sees a
    bounded trickle of retries, not a retry storm."""

    ratio: float = 0.2
    reserve: float = 10.0
    _tokens: float = field(init=False)

    def __post_init__(self) -> None:
        self._tokens = self.reserve

    def earn(self) -> None:
        self._tokens = min(self.reserve, self._tokens + self.ratio)

    def try_spend(self) -> bool:
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with full jitter on connection errors, 429 and 503."""

    max_attempts: int = 4  # the first try included
    base_delay: float = 0.25
    max_delay: float = 8.0
    max_retry_after: float = 30.0  # a server asking for longer than this is not waited for
    retry_statuses: frozenset[int] = frozenset({429, 503})

    def delay(self, retry: int, retry_after: float | None, rng: random.Random | None = None) -> float:
        """Seconds to wait before retry number `retry` (1 = the first retry)."""
        jittered = (rng or random).uniform(0.0, min(self.max_delay, self.base_delay * 2 ** (retry - 1)))
        return max(jittered, retry_after or 0.0)


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After as seconds: either delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())
