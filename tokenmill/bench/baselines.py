"""In-process baselines for `tokenmill bench --baselines`, and the ratios that compare them."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from tokenmill.bench.targets import engine_and_mode
from tokenmill.config import Settings


def _measure(kind: str, concurrency: int, requests: int, max_tokens: int, settings: Settings) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "tokenmill.bench.inprocess",
        kind,
        str(concurrency),
        str(requests),
        str(max_tokens),
        settings.model_dump_json(),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def measure_baselines(levels: list[int], args: argparse.Namespace, settings: Settings) -> dict:
    """`settings`: the served configuration (the bench's first --serve-args, parsed by the CLI)."""
    requests = lambda c: args.requests or max(8, 4 * c)
    results = {"llama": _measure("llama", 1, requests(1), args.max_tokens, settings)}
    for level in levels:
        results[f"batch@{level}"] = _measure("batch", level, requests(level), args.max_tokens, settings)
        print(
            f"in-process {results[f'batch@{level}']['name']} at {level}: {results[f'batch@{level}']['tokens_per_s']:.1f} tok/s",
            flush=True,
        )
    return results


def ratio_table(rows: list[dict], baselines: dict, engine: str) -> str:
    """HTTP rows over the in-process baselines, which ran `engine`: a row's target is a --modes
    entry, MODE or ENGINE:MODE (a bare MODE serves the settings' engine), then any --serve-args."""

    def http(mode: str, level: int) -> float | None:
        for row in rows:
            row_engine, row_mode = engine_and_mode(row["target"])
            if row_mode == mode and row_engine in ("", engine) and row["concurrency"] == level:
                return row["output_tokens_per_s"]
        return None

    levels = sorted({row["concurrency"] for row in rows})
    lines = ["| comparison | tok/s | over | tok/s | ratio |", "|---|---|---|---|---|"]

    def add(name: str, a: float | None, b_name: str, b: float | None) -> None:
        if a and b:
            lines.append(f"| {name} | {a:.1f} | {b_name} | {b:.1f} | {a / b:.2f}x |")

    for level in levels:
        add(f"HTTP batch @{level}", http("batch", level), f"HTTP async @{level}", http("async", level))
    for level in levels:
        add(
            f"HTTP batch @{level}",
            http("batch", level),
            f"in-process batch runner @{level}",
            baselines[f"batch@{level}"]["tokens_per_s"],
        )
    add("HTTP batch @1", http("batch", 1), "llama_cpp.Llama loop @1", baselines["llama"]["tokens_per_s"])
    return "\n".join(lines)
