"""Render results: a table for people, JSON and CSV for machines."""

from __future__ import annotations

import csv
import json
from pathlib import Path

COLUMNS = [
    ("target", "target", "{}"),
    ("round", "round", "{}"),
    ("concurrency", "conc", "{}"),
    ("rate", "rate/s", "{:g}"),
    ("ok", "ok", "{}"),
    ("rejected", "503", "{}"),
    ("errors", "err", "{}"),
    ("output_tokens_per_s", "tok/s", "{:.1f}"),
    ("steady_output_tokens_per_s", "steady tok/s", "{:.1f}"),
    ("request_throughput", "req/s", "{:.2f}"),
    ("ttft_p50", "TTFT p50 ms", "{:.0f}"),
    ("ttft_p99", "TTFT p99 ms", "{:.0f}"),
    ("steady_ttft_p99", "steady TTFT p99 ms", "{:.0f}"),
    ("itl_p50", "ITL p50 ms", "{:.1f}"),
    ("itl_p99", "ITL p99 ms", "{:.1f}"),
    ("latency_p50", "E2E p50 s", "{:.2f}"),
    ("latency_p99", "E2E p99 s", "{:.2f}"),
    ("server_loop_lag_p99", "server loop lag p99 ms", "{:.1f}"),
    ("client_loop_lag_max", "bench loop lag max ms", "{:.1f}"),
    ("peak_rss_mb", "peak RSS MB", "{:.0f}"),
    ("startup_s", "start-up s", "{:.1f}"),
    ("cost_per_million_tokens", "$/M tok", "{:.2f}"),
]
_MILLISECONDS = {
    "ttft_p50",
    "ttft_p99",
    "steady_ttft_p99",
    "itl_p50",
    "itl_p99",
    "server_loop_lag_p99",
    "client_loop_lag_max",
}


def _cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None:
        return "-"
    if key in _MILLISECONDS:
        value = value * 1000
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def rule(header: str) -> str:
    """The markdown line under `header` ("| a | b |" -> "|---|---|")."""
    return "|---" * (header.count(" | ") + 1) + "|"


def table(rows: list[dict]) -> str:
    """A GitHub-flavoured markdown table (readable in a terminal, pasteable into docs).
    Columns no row has (e.g. rate in a closed-loop run) are left out."""
    columns = [c for c in COLUMNS if any(c[0] in row for row in rows)]
    header = "| " + " | ".join(title for _, title, _ in columns) + " |"
    lines = [header, rule(header)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row, key, fmt) for key, _, fmt in columns) + " |")
    return "\n".join(lines)


def write(rows: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(key for row in rows for key in row)))
        writer.writeheader()
        writer.writerows(rows)
    (out / "results.md").write_text(table(rows) + "\n")
