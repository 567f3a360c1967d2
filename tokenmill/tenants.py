"""Who a request belongs to, and what that tenant may use: weights, quotas, priority caps.

A tenant is an API key's owner. The key file names them, one key per line, with optional fields:

    sk-team-a   name=team-a weight=3 tokens_per_minute=60000 requests_per_minute=120 max_priority=5
    sk-team-b   name=team-b
    sk-old                      # a bare key, as before: its own group, counted as "other"

- `weight` (default 1): the tenant's share of the server while it is contended (server/admission.py).
- `tokens_per_minute`, `requests_per_minute`: token-bucket quotas (prompt plus generated tokens);
  over quota is a 429 with the bucket's refill time as `Retry-After`, never a 503.
- `max_priority`: a request's priority is capped at this (default 0: no raised priority).

Requests without a key (the server runs without keys) form one group. Metrics label tenants by
their name; unnamed keys and keyless requests are "other", so label cardinality stays bounded by
the key file.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from tokenmill.errors import QuotaExceeded

OTHER = "other"  # the metrics label of every tenant the key file does not name
ANONYMOUS = "anonymous"  # the group of requests without a key
_FIELDS = {"name", "weight", "tokens_per_minute", "requests_per_minute", "max_priority"}


@dataclass(frozen=True, slots=True)
class Tenant:
    group: str  # fair-share and quota identity (a name, or an internal id for an unnamed key)
    label: str  # what metrics call it
    weight: float = 1.0
    tokens_per_minute: int | None = None
    requests_per_minute: int | None = None
    max_priority: int = 0

    def priority(self, asked: int | None) -> int:
        """The priority a request runs at: what it asked for, capped by its key's allowance."""
        return min(asked or 0, self.max_priority)


ANONYMOUS_TENANT = Tenant(ANONYMOUS, OTHER)


def parse_key_line(line: str, index: int) -> tuple[str, Tenant] | None:
    """One key file line: `KEY [field=value ...]` (a `#` starts a comment). None for a blank line."""
    words = line.split("#", 1)[0].split()
    if not words:
        return None
    key, settings = words[0], dict[str, str]()
    for word in words[1:]:
        setting, sep, value = word.partition("=")
        if not sep or setting not in _FIELDS:
            raise ValueError(f"key file line {index + 1}: '{word}' is not one of {sorted(_FIELDS)} as name=value")
        settings[setting] = value
    name = settings.get("name")
    try:
        tenant = Tenant(
            group=name or f"key-{index + 1}",
            label=name or OTHER,
            weight=float(settings.get("weight", 1)),
            tokens_per_minute=_positive_int(settings.get("tokens_per_minute")),
            requests_per_minute=_positive_int(settings.get("requests_per_minute")),
            max_priority=int(settings.get("max_priority", 0)),
        )
    except ValueError as error:
        raise ValueError(f"key file line {index + 1}: {error}") from None
    if not tenant.weight > 0:
        raise ValueError(f"key file line {index + 1}: weight must be positive")
    return key, tenant


def _positive_int(value: str | None) -> int | None:
    if value is None:
        return None
    number = int(value)
    if number <= 0:
        raise ValueError(f"a quota must be a positive whole number, not {value}")
    return number


def parse_keys(lines: Iterable[str]) -> dict[str, Tenant]:
    """Every key of a key file (or of --api-key, bare keys) and its tenant; ValueError names the
    first bad line."""
    tenants: dict[str, Tenant] = {}
    for index, line in enumerate(lines):
        parsed = parse_key_line(line, index)
        if parsed is not None:
            key, tenant = parsed
            tenants[key] = tenant
    return tenants


class TokenBucket:
    """`per_minute` units a minute, refilled continuously, holding at most a minute's worth. A
    charge may take it below zero (a request's tokens are known only when it ends): it is then
    empty until refilled past zero."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic):
        self.per_minute = per_minute
        self._clock = clock
        self._level = float(per_minute)
        self._at = clock()

    def level(self) -> float:
        now = self._clock()
        self._level = min(float(self.per_minute), self._level + (now - self._at) * self.per_minute / 60.0)
        self._at = now
        return self._level

    def seconds_until(self, units: float) -> float:
        """How long until the bucket holds `units` (0 if it does now)."""
        missing = units - self.level()
        return max(0.0, missing * 60.0 / self.per_minute)

    def charge(self, units: float) -> None:
        self.level()
        self._level -= units


@dataclass
class Quotas:
    """The buckets of every tenant with a quota, made on first use."""

    clock: Callable[[], float] = time.monotonic
    _requests: dict[str, TokenBucket] = field(default_factory=dict)
    _tokens: dict[str, TokenBucket] = field(default_factory=dict)

    def check(self, tenant: Tenant) -> None:
        """Raise QuotaExceeded if the tenant may not start a request now (nothing is taken)."""
        requests = self._bucket(self._requests, tenant.group, tenant.requests_per_minute)
        tokens = self._bucket(self._tokens, tenant.group, tenant.tokens_per_minute)
        if requests is not None and (wait := requests.seconds_until(1)) > 0:
            raise QuotaExceeded(
                f"This key is over its quota of {tenant.requests_per_minute} requests per minute.",
                retry_after=wait,
                code="requests_per_minute_exceeded",
            )
        if tokens is not None and (wait := tokens.seconds_until(1)) > 0:
            raise QuotaExceeded(
                f"This key is over its quota of {tenant.tokens_per_minute} tokens per minute.",
                retry_after=wait,
                code="tokens_per_minute_exceeded",
            )

    def charge_request(self, tenant: Tenant) -> None:
        bucket = self._bucket(self._requests, tenant.group, tenant.requests_per_minute)
        if bucket is not None:
            bucket.charge(1)

    def charge_tokens(self, tenant: Tenant, tokens: int) -> None:
        bucket = self._bucket(self._tokens, tenant.group, tenant.tokens_per_minute)
        if bucket is not None:
            bucket.charge(tokens)

    def _bucket(self, buckets: dict[str, TokenBucket], group: str, per_minute: int | None) -> TokenBucket | None:
        if per_minute is None:
            return None
        if group not in buckets:
            buckets[group] = TokenBucket(per_minute, self.clock)
        return buckets[group]
