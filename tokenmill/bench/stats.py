"""Per-request records and the statistics a run is judged by. Pure functions, no I/O."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Literal

Status = Literal["ok", "rejected", "timeout", "error"]


@dataclass
class RequestRecord:
    started: float  # seconds since the run began
    status: Status = "error"
    ttft: float | None = None  # seconds to the first content token
    gaps: list[float] = field(default_factory=list)  # seconds between consecutive tokens
    latency: float | None = None  # seconds to the end of the stream
    output_tokens: int = 0
    prompt_tokens: int = 0  # as the server's usage reports them
    cached_tokens: int = 0  # of those, served from its prefix cache
    error: str | None = None
    http_status: int | None = None
    retry_after: float | None = None  # a refusal's Retry-After header, seconds


def median_and_range(values: list[float]) -> tuple[float, float, float]:
    """(median, lowest, highest) of a non-empty list: a ratio measured once per round."""
    ordered = sorted(values)
    return statistics.median(ordered), ordered[0], ordered[-1]


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (the 'linear' method of numpy), q in [0, 100]."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True)
class Summary:
    requests: int
    ok: int
    rejected: int
    errors: int
    duration_s: float
    request_throughput: float
    output_tokens_per_s: float
    ttft_p50: float
    ttft_p90: float
    ttft_p99: float
    itl_p50: float
    itl_p90: float
    itl_p99: float
    latency_p50: float
    latency_p90: float
    latency_p99: float
    goodput: float  # requests/s that met the SLO
    steady_ttft_p50: float  # TTFT of requests sent after the first one finished (first wave excluded)
    steady_ttft_p99: float
    steady_output_tokens_per_s: float  # from the first completion to the last request sent: every client busy

    def as_row(self) -> dict:
        return dict(self.__dict__)


def summarize(
    records: list[RequestRecord], duration_s: float, slo_ttft: float | None = None, slo_itl: float | None = None
) -> Summary:
    ok = [r for r in records if r.status == "ok"]
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    gaps = [g for r in ok for g in r.gaps]
    latencies = [r.latency for r in ok if r.latency is not None]

    def meets_slo(r: RequestRecord) -> bool:
        if slo_ttft is not None and (r.ttft is None or r.ttft > slo_ttft):
            return False
        return not (slo_itl is not None and r.gaps and percentile(r.gaps, 99) > slo_itl)

    good = sum(1 for r in ok if meets_slo(r))
    first_done = min((r.started + r.latency for r in ok if r.latency is not None), default=math.inf)
    steady = [r.ttft for r in ok if r.ttft is not None and r.started >= first_done]
    last_sent = max((r.started for r in records), default=-math.inf)
    per_s = (lambda n: n / duration_s) if duration_s > 0 else (lambda n: math.nan)
    return Summary(
        requests=len(records),
        ok=len(ok),
        rejected=sum(1 for r in records if r.status == "rejected"),
        errors=sum(1 for r in records if r.status in ("error", "timeout")),
        duration_s=duration_s,
        request_throughput=per_s(len(ok)),
        output_tokens_per_s=per_s(sum(r.output_tokens for r in ok)),
        ttft_p50=percentile(ttfts, 50),
        ttft_p90=percentile(ttfts, 90),
        ttft_p99=percentile(ttfts, 99),
        itl_p50=percentile(gaps, 50),
        itl_p90=percentile(gaps, 90),
        itl_p99=percentile(gaps, 99),
        latency_p50=percentile(latencies, 50),
        latency_p90=percentile(latencies, 90),
        latency_p99=percentile(latencies, 99),
        goodput=per_s(good),
        steady_ttft_p50=percentile(steady, 50),
        steady_ttft_p99=percentile(steady, 99),
        steady_output_tokens_per_s=_tokens_per_s_between(ok, first_done, last_sent),
    )


def _tokens_per_s_between(records: list[RequestRecord], start: float, end: float) -> float:
    """Streamed tokens that arrived in [start, end), per second (each token's time rebuilt from TTFT and gaps)."""
    if not end > start:
        return math.nan
    arrived = 0
    for r in records:
        if r.ttft is None:
            continue
        at = r.started + r.ttft
        arrived += start <= at < end
        for gap in r.gaps:
            at += gap
            arrived += start <= at < end
    return arrived / (end - start)
