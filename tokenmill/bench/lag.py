"""Event-loop lag: the server's (scraped from its /metrics histogram) and the load generator's own."""

from __future__ import annotations

import asyncio
import math
import time
from typing import Self

import httpx

_SERIES = "tokenmill_event_loop_lag_seconds_bucket"


async def scrape_lag_buckets(client: httpx.AsyncClient) -> dict[float, float] | None:
    """Cumulative counts per bucket bound, or None when the server is not tokenmill."""
    try:
        response = await client.get("/metrics", timeout=5)
    except httpx.HTTPError:
        return None
    if response.status_code != 200 or _SERIES not in response.text:
        return None
    buckets = {}
    for line in response.text.splitlines():
        if line.startswith(_SERIES):
            bound = line.split('le="')[1].split('"')[0]
            buckets[math.inf if bound == "+Inf" else float(bound)] = float(line.rsplit(" ", 1)[1])
    return buckets


def lag_p99(before: dict[float, float] | None, after: dict[float, float] | None) -> float | None:
    """The upper bound of the bucket holding the 99th percentile of lags observed in between."""
    if not before or not after:
        return None
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    total = counts[-1]
    if total <= 0:
        return None
    for bound, cumulative in zip(bounds, counts, strict=True):
        if cumulative >= 0.99 * total:
            return bound
    return bounds[-1]


class OwnLoopLag:
    """Measures the load generator's own event loop while a run is going on."""

    def __init__(self, interval: float = 0.05):
        self._interval = interval
        self.samples: list[float] = []
        self._task: asyncio.Task | None = None

    async def _watch(self) -> None:
        while True:
            started = time.perf_counter()
            await asyncio.sleep(self._interval)
            self.samples.append(max(0.0, time.perf_counter() - started - self._interval))

    def __enter__(self) -> Self:
        self._task = asyncio.ensure_future(self._watch())
        return self

    def __exit__(self, *exc) -> None:
        if self._task:
            self._task.cancel()

    @property
    def worst(self) -> float:
        return max(self.samples, default=0.0)
