"""llama.cpp's own C++ programs as baselines for `tokenmill bench --cpp-baselines DIR`.

`tools/build-llama-baselines.sh DIR` builds them from the llama.cpp that tokenmill's engine runs
(vendored in the pinned llama-cpp-python sdist):
- `llama-server`: measured as one more target, with the same load client and workload as
  tokenmill's modes, in the same run (`-np` = the highest concurrency, each slot its own context);
- `llama-batched-bench`: the kernels alone, no server: its decode rate (S_TG) for as many
  sequences as each concurrency level, as many output tokens per sequence as the workload asks.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

from tokenmill.bench import report
from tokenmill.bench.spawn import SpawnedServer
from tokenmill.bench.stats import median_and_range
from tokenmill.bench.workload import Workload
from tokenmill.engines.model_files import resolve_model_path

SLOT_CONTEXT = 1024  # tokens of context per llama-server slot: the bench's prompts plus answers fit


def llama_server(directory: Path, model: Path, slots: int, threads: int, cpus: set[int] | None = None) -> SpawnedServer:
    """llama-server on a free loopback port, ready (its /health answers 200)."""
    flags = ["-m", str(model), "-np", str(slots), "-c", str(slots * SLOT_CONTEXT), "-t", str(threads)]
    return SpawnedServer(flags, program=[str(directory / "llama-server")], ready_path="/health", cpus=cpus)


def batched_bench_command(
    directory: Path, model: Path, levels: list[int], prompt_tokens: int, max_tokens: int, threads: int
) -> list[str]:
    context = max(levels) * (prompt_tokens + max_tokens) + 256
    return [
        str(directory / "llama-batched-bench"),
        *("-m", str(model), "-c", str(context), "-b", "512", "-ub", "512", "-t", str(threads)),
        *("-npp", str(prompt_tokens), "-ntg", str(max_tokens), "-npl", ",".join(map(str, levels))),
        *("--output-format", "jsonl"),
    ]


def decode_rates(output: str) -> dict[int, float]:
    """llama-batched-bench's jsonl lines -> {sequences at once: decode tokens/s (speed_tg)}."""
    rates = {}
    for line in output.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            rates[int(row["pl"])] = float(row["speed_tg"])
    return rates


def batched_bench(
    directory: Path, model: Path, levels: list[int], prompt_tokens: int, max_tokens: int, threads: int
) -> dict[int, float]:
    command = batched_bench_command(directory, model, levels, prompt_tokens, max_tokens, threads)
    done = subprocess.run(command, capture_output=True, text=True, check=True, timeout=1800)
    return decode_rates(done.stdout + done.stderr)


SERVER_LABEL = "llama-server (C++)"
PROMPT_TOKENS = 48  # llama-batched-bench's prompt per sequence: about the bench's chat prompts


def _served(args: argparse.Namespace) -> tuple[Path, int]:
    """The model file and threads the spawned tokenmill serves with (its first --serve-args)."""
    settings = args.baseline_settings
    return resolve_model_path(settings.model), settings.threads_per_replica()


def llama_server_for(args: argparse.Namespace, slots: int, cpus: set[int] | None) -> SpawnedServer:
    """llama-server on the model and threads tokenmill serves, `slots` sequences at once."""
    model, threads = _served(args)
    return llama_server(args.cpp_baselines, model, slots, threads, cpus)


def kernel_rates(levels: list, workload: Workload, args: argparse.Namespace) -> dict[int, float]:
    """llama-batched-bench's decode rate at each level, on the model and threads tokenmill serves."""
    model, threads = _served(args)
    return batched_bench(
        args.cpp_baselines, model, [int(level) for level in levels], PROMPT_TOKENS, workload.max_tokens, threads
    )


def compare(
    rows: list[dict],
    levels: list,
    workload: Workload,
    args: argparse.Namespace,
    kernels_by_round: dict[int | None, dict[int, float]] | None = None,
) -> str:
    """Each tokenmill target over llama-server and over llama-batched-bench's decode rate, per level:
    against the llama-server and the kernels of the same round where the run had several (--rounds
    measures the kernels after each round: `kernels_by_round`; otherwise they run now), then each
    ratio's median over the rounds."""
    measured_now = {} if kernels_by_round else kernel_rates(levels, workload, args)
    by_key = {(row["target"], row["concurrency"], row.get("round")): row for row in rows}
    header = (
        "| target | concurrency | tok/s | llama-server tok/s | ratio | batched-bench decode tok/s | ratio "
        "| TTFT p50 ms | llama-server TTFT p50 ms |"
    )
    rounds = sorted({key[2] for key in by_key if key[2] is not None})
    if rounds:
        header = "| round " + header
    lines = [header, report.rule(header)]
    ratios: dict[tuple[str, int], list[tuple[float, float | None]]] = {}
    for (target, level, round_number), row in by_key.items():
        server = by_key.get((SERVER_LABEL, level, round_number))
        if target == SERVER_LABEL or server is None:
            continue
        decode = kernels_by_round.get(round_number, {}) if kernels_by_round else measured_now
        ours, theirs, kernels = row["output_tokens_per_s"], server["output_tokens_per_s"], decode.get(int(level))
        ratios.setdefault((target, level), []).append((ours / theirs, ours / kernels if kernels else None))
        lines.append(
            ("" if round_number is None else f"| {round_number} ")
            + f"| {target} | {level} | {ours:.1f} | {theirs:.1f} | {ours / theirs:.2f}x | "
            + (f"{kernels:.1f} | {ours / kernels:.2f}x" if kernels else "- | -")
            + f" | {1000 * row['ttft_p50']:.0f} | {1000 * server['ttft_p50']:.0f} |"
        )
    if len(rounds) > 1:
        lines += ["", f"Median over {len(rounds)} rounds (lowest-highest):", ""]
        lines += ["| target | concurrency | over llama-server | over batched-bench |", "|---|---|---|---|"]
        for (target, level), pairs in ratios.items():
            lines.append(
                f"| {target} | {level} | {_spread([a for a, _ in pairs])} | {_spread([b for _, b in pairs])} |"
            )
    return "\n".join(lines)


def _spread(values: list[float | None]) -> str:
    known = [v for v in values if v is not None]
    if not known:
        return "-"
    median, lowest, highest = median_and_range(known)
    return f"{median:.2f}x ({lowest:.2f}-{highest:.2f})"
