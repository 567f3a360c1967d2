"""Multi-tenant load: several API keys at once, each with its own load, weight and quota.

`--tenants "flood:rate=60,steady:rate=2"` sends each tenant's requests with its own key: `rate=`
is an open loop (Poisson arrivals, requests/s), `concurrency=` a closed loop. With `--spawn` the
bench writes the key file the server gets (`weight=`, `tokens_per_minute=`, `requests_per_minute=`
go into it); against `--url`, give each tenant's `key=`. `--tenants-alone steady` first runs that
tenant alone, so its figures with and without the others come from the same run.

Reported per tenant: sent, completed, refused (503 and 429 apart, with their Retry-After), lost
(neither completed nor refused: what must never happen), TTFT p50/p99, and output tokens/s and
the share of all output tokens, both over the requests that finished while every tenant was still
sending. Nothing is timed before `warm_up` has sent each prompt once.
"""

from __future__ import annotations

import asyncio
import math
import multiprocessing
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from tokenmill.bench.http1 import Http1Client
from tokenmill.bench.loadgen import closed_loop, open_loop, stream_one
from tokenmill.bench.report import rule
from tokenmill.bench.stats import RequestRecord, median_and_range, percentile
from tokenmill.bench.workload import PROMPTS, Workload

_KEY_FILE_FIELDS = ("weight", "tokens_per_minute", "requests_per_minute")
_QUOTA_FIELDS = {"tokens_per_minute", "requests_per_minute"}


@dataclass(frozen=True)
class TenantLoad:
    name: str
    rate: float | None = None  # open loop, requests/s
    concurrency: int | None = None  # closed loop
    key: str = ""
    key_file_fields: tuple[tuple[str, str], ...] = ()

    @property
    def api_key(self) -> str:
        return self.key or f"bench-{self.name}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}


def parse_tenants(spec: str) -> list[TenantLoad]:
    """'flood:rate=60,steady:rate=2:weight=3' -> one TenantLoad each."""
    loads = []
    for part in spec.split(","):
        name, *fields = part.strip().split(":")
        settings = dict(field.split("=", 1) for field in fields if "=" in field)
        unknown = set(settings) - {"rate", "concurrency", "key", *_KEY_FILE_FIELDS}
        if not name or unknown or len(settings) != len(fields):
            raise ValueError(f"--tenants: cannot read '{part}' (NAME:rate=R or NAME:concurrency=N, then options)")
        if ("rate" in settings) == ("concurrency" in settings):
            raise ValueError(f"--tenants: '{name}' needs exactly one of rate= or concurrency=")
        loads.append(
            TenantLoad(
                name,
                rate=float(settings["rate"]) if "rate" in settings else None,
                concurrency=int(settings["concurrency"]) if "concurrency" in settings else None,
                key=settings.get("key", ""),
                key_file_fields=tuple((k, settings[k]) for k in _KEY_FILE_FIELDS if k in settings),
            )
        )
    return loads


def write_key_file(loads: list[TenantLoad], path: Path) -> Path:
    lines = [
        " ".join([load.api_key, f"name={load.name}", *(f"{k}={v}" for k, v in load.key_file_fields)]) for load in loads
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


async def run_tenants(
    url: str, model: str, workload: Workload, loads: list[TenantLoad], duration: float
) -> dict[str, list[RequestRecord]]:
    """Every tenant's load at once for `duration` seconds (then what is in flight ends), each in
    a process of its own, as separate apps would be: a flood's client work (its refusals, its
    streams) then never delays the timing of another tenant's tokens in a shared event loop."""
    context = multiprocessing.get_context("spawn")
    loop = asyncio.get_running_loop()
    with ProcessPoolExecutor(len(loads), mp_context=context) as pool:
        jobs = [loop.run_in_executor(pool, _one_tenant, url, model, workload, load, duration) for load in loads]
        results = await asyncio.gather(*jobs)
    return {load.name: records for load, records in zip(loads, results, strict=True)}


async def warm_up(url: str, model: str, workload: Workload, loads: list[TenantLoad]) -> None:
    """Each of the workload's prompts once, one token each, before anything is timed: the first
    request a server answers and the first sight of each prompt are cold (measured: 110 ms where a
    warm one took 29), which would inflate only the first phase's figures. Sent with the key of a
    tenant without a quota, so no measured quota is spent; with none, not at all."""
    load = next((load for load in loads if not dict(load.key_file_fields).keys() & _QUOTA_FIELDS), None)
    if load is None:
        return
    async with Http1Client(url, load.headers, timeout=60) as client:
        for index in range(len(PROMPTS)):
            body = workload.request_body(index, model) | {"max_tokens": 1}
            body["messages"][-1]["content"] = PROMPTS[index]
            await stream_one(client, body, 0.0)


def tenant_seed(name: str) -> int:
    """A tenant's seed for its prompts and arrivals: from its name, so that it sends the same
    requests at the same moments alone and beside the others (a seed from its place in a phase's
    list gave a tenant alone another Poisson sequence than together: what was compared was then
    two loads, not one load with and without the others)."""
    return zlib.crc32(name.encode())


def _one_tenant(url: str, model: str, workload: Workload, load: TenantLoad, duration: float) -> list[RequestRecord]:
    """One tenant's load, in its own process (its records' times count from its own start)."""
    headers = load.headers
    seed = tenant_seed(load.name)
    shifted = replace(workload, seed=workload.seed + seed)
    if load.rate is not None:
        records, _ = asyncio.run(
            open_loop(url, model, shifted, load.rate, None, duration=duration, seed=seed, headers=headers)
        )
    else:
        assert load.concurrency is not None
        records, _ = asyncio.run(
            closed_loop(url, model, shifted, load.concurrency, None, duration=duration, headers=headers)
        )
    return records


def tenant_rows(label: str, phase: str, per_tenant: dict[str, list[RequestRecord]], window: float) -> list[dict]:
    """Output tokens/s and the token share count the requests that finished within the sending
    window: after it, the tenants that stop sending leave the server to whoever still waits, which
    is not the contended state being measured."""

    def within(records: list[RequestRecord]) -> int:
        return sum(
            r.output_tokens
            for r in records
            if r.status == "ok" and r.latency is not None and r.started + r.latency <= window
        )

    total_tokens = sum(within(records) for records in per_tenant.values())
    rows = []
    for name, records in per_tenant.items():
        ok = [r for r in records if r.status == "ok"]
        ttfts = [r.ttft for r in ok if r.ttft is not None]
        tokens = within(records)
        waits = [r.retry_after for r in records if r.retry_after is not None]
        rows.append(
            {
                "target": label,
                "phase": phase,
                "tenant": name,
                "sent": len(records),
                "ok": len(ok),
                "refused_503": sum(1 for r in records if r.http_status == 503),
                "refused_429": sum(1 for r in records if r.http_status == 429),
                "lost": sum(1 for r in records if r.status not in ("ok", "rejected")),
                "ttft_p50_ms": 1000 * percentile(ttfts, 50) if ttfts else None,
                "ttft_p99_ms": 1000 * percentile(ttfts, 99) if ttfts else None,
                "output_tok_s": tokens / window if window else 0.0,
                "token_share": tokens / total_tokens if total_tokens else 0.0,
                "retry_after_p50_s": percentile(waits, 50) if waits else None,
            }
        )
    return rows


def request_rows(where: dict, per_tenant: dict[str, list[RequestRecord]]) -> list[dict]:
    """One row per request of a phase (`where`: its target, phase and round): when it was sent
    (seconds into the phase), how it ended, and its TTFT."""
    return [
        {**where, "tenant": name, "started_s": round(r.started, 3), "status": r.status, "http_status": r.http_status}
        | ({"ttft_ms": round(1000 * r.ttft, 1)} if r.ttft is not None else {})
        for name, records in per_tenant.items()
        for r in records
    ]


def alone_ratios(rows: list[dict]) -> str:
    """For each tenant measured alone too: its TTFT p50 and p99 together over alone, per round, and
    the p99 ratio's median over the rounds. Empty when no tenant ran alone."""
    alone = {(r["target"], r.get("round"), r["tenant"]): r for r in rows if r["phase"] == "alone"}
    lines: list[str] = []
    p99_ratios: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        base = alone.get((r["target"], r.get("round"), r["tenant"]))
        if r["phase"] != "together" or base is None or not base["ttft_p99_ms"] or r["ttft_p99_ms"] is None:
            continue
        p50 = r["ttft_p50_ms"] / base["ttft_p50_ms"] if base["ttft_p50_ms"] else math.nan
        p99 = r["ttft_p99_ms"] / base["ttft_p99_ms"]
        p99_ratios.setdefault((r["target"], r["tenant"]), []).append(p99)
        lines.append(f"| {r['target']} | {r.get('round') or ''} | {r['tenant']} | {p50:.2f}x | {p99:.2f}x |")
    if not lines:
        return ""
    header = [
        "| target | round | tenant | TTFT p50 together / alone | TTFT p99 together / alone |",
        "|---|---|---|---|---|",
    ]
    medians = []
    for (target, tenant), ratios in p99_ratios.items():
        median, lowest, highest = median_and_range(ratios)
        medians.append(
            f"- {target}, {tenant}: TTFT p99 together / alone, median {median:.2f}x "
            f"over {len(ratios)} round(s) ({lowest:.2f}-{highest:.2f}x)"
        )
    return "\n".join([*header, *lines, "", *medians])


def table(rows: list[dict]) -> str:
    rounds = any("round" in r for r in rows)
    header = (
        ("| round " if rounds else "")
        + "| target | phase | tenant | sent | ok | 503 | 429 | lost | TTFT p50 ms | TTFT p99 ms | output tok/s | "
        "token share | Retry-After p50 s |"
    )
    lines = [header, rule(header)]

    def fmt(value: float | None, digits: int = 0) -> str:
        return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"

    for r in rows:
        lines.append(
            (f"| {r.get('round', '')} " if rounds else "")
            + f"| {r['target']} | {r['phase']} | {r['tenant']} | {r['sent']} | {r['ok']} | {r['refused_503']} | "
            f"{r['refused_429']} | {r['lost']} | {fmt(r['ttft_p50_ms'])} | {fmt(r['ttft_p99_ms'])} | "
            f"{fmt(r['output_tok_s'], 1)} | {r['token_share']:.0%} | {fmt(r['retry_after_p50_s'])} |"
        )
    return "\n".join(lines)
