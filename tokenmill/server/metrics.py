"""Prometheus metrics (names prefixed `tokenmill_`) and the event-loop lag monitor."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

LOOP_LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    """One registry per app, so several apps in one process (tests) never collide."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "tokenmill_requests", "HTTP requests by route and status", ["route", "status"], registry=r
        )
        self.rejections = Counter(
            "tokenmill_rejections", "Requests refused before any work, by reason", ["reason"], registry=r
        )
        self.ignored_fields = Counter(
            "tokenmill_ignored_fields",
            "Request fields accepted and ignored, by field ('unknown': a name tokenmill does not know, dropped "
            "with --lenient-fields or an extra key on a text part)",
            ["field"],
            registry=r,
        )
        self.aborts = Counter("tokenmill_aborts", "Generations stopped early, by reason", ["reason"], registry=r)
        self.prompt_tokens = Counter("tokenmill_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter(
            "tokenmill_generation_tokens", "Generated tokens of finished requests", registry=r
        )
        # per tenant (named in the key file; every other key, and no key, is "other")
        self.tenant_admitted = Counter(
            "tokenmill_tenant_admitted", "Requests admitted, by tenant", ["tenant"], registry=r
        )
        self.tenant_refused = Counter(
            "tokenmill_tenant_refused",
            "Requests refused before any work, by tenant and reason",
            ["tenant", "reason"],
            registry=r,
        )
        self.tenant_tokens = Counter(
            "tokenmill_tenant_tokens",
            "Tokens of finished requests, by tenant and kind (prompt, generated)",
            ["tenant", "kind"],
            registry=r,
        )
        self.tenant_queue_wait = Histogram(
            "tokenmill_tenant_queue_wait_seconds",
            "Time admitted requests waited for a place, by tenant",
            ["tenant"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait_error = Histogram(
            "tokenmill_queue_wait_estimate_error_seconds",
            "How far the wait predicted when a request joined the queue was from its real wait (absolute)",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "tokenmill_time_to_first_token_seconds", "Arrival to first token", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.itl = Histogram(
            "tokenmill_inter_token_latency_seconds",
            "Gap between consecutive tokens",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "tokenmill_request_duration_seconds", "Arrival to last token", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.loop_lag = Histogram(
            "tokenmill_event_loop_lag_seconds",
            "How late each event-loop tick (every 50 ms) woke up",
            buckets=LOOP_LAG_BUCKETS,
            registry=r,
        )
        self.loop_lag_max = Gauge(
            "tokenmill_event_loop_lag_max_seconds", "Worst event-loop lag since start", registry=r
        )

    def gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        Gauge(name, help_text, registry=self.registry).set_function(read)

    def labelled_counter(self, name: str, help_text: str, label: str, read: Callable[[], dict[str, int]]) -> None:
        """A counter kept elsewhere (a runner's own tally), read at each scrape."""
        self.registry.register(_CounterReader(name, help_text, label, read))

    def counter(self, name: str, help_text: str, read: Callable[[], int]) -> None:
        """An unlabelled counter kept elsewhere (an engine's tally), read at each scrape."""
        self.registry.register(_CounterReader(name, help_text, None, lambda: {"": read()}))


class _CounterReader(Collector):
    def __init__(self, name: str, help_text: str, label: str | None, read: Callable[[], dict[str, int]]):
        self._name, self._help, self._label, self._read = name, help_text, label, read

    def collect(self) -> Iterator[CounterMetricFamily]:
        if self._label is None:
            yield CounterMetricFamily(self._name, self._help, value=self._read()[""])
            return
        family = CounterMetricFamily(self._name, self._help, labels=[self._label])
        for value, count in sorted(self._read().items()):
            family.add_metric([value], count)
        yield family


async def watch_event_loop(metrics: Metrics, interval: float = 0.05, warn_after: float = 0.1) -> None:
    """Sleep `interval` over and over; any extra delay is time the loop was blocked."""
    worst = 0.0
    while True:
        started = time.perf_counter()
        await asyncio.sleep(interval)
        lag = max(0.0, time.perf_counter() - started - interval)
        metrics.loop_lag.observe(lag)
        if lag > worst:
            worst = lag
            metrics.loop_lag_max.set(lag)
        if lag > warn_after:
            log.warning("event loop blocked for %.0f ms: something ran a blocking call on the loop", lag * 1000)
