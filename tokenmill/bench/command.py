"""`tokenmill bench`: run one workload against a server, or against tokenmill in several modes."""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
from pathlib import Path

import httpx

from tokenmill.bench import quoting, report, targets
from tokenmill.bench.lag import OwnLoopLag, lag_p99, scrape_lag_buckets
from tokenmill.bench.loadgen import closed_loop, open_loop, served_model
from tokenmill.bench.spawn import SpawnedServer
from tokenmill.bench.stats import summarize
from tokenmill.bench.workload import Workload


def add_arguments(parser: argparse.ArgumentParser) -> None:
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="base URL of any OpenAI-compatible server (e.g. http://127.0.0.1:8000)")
    target.add_argument("--spawn", action="store_true", help="start tokenmill itself, once per --modes entry")
    parser.add_argument(
        "--modes",
        default="async,batch",
        help="with --spawn: comma-separated serving modes, each optionally ENGINE:MODE to compare engines "
        "in one run (e.g. llamacpp:batch,torch:batch) [async,batch]",
    )
    parser.add_argument(
        "--serve-args",
        action="append",
        help="with --spawn: extra `tokenmill serve` flags, quoted; give it several times to compare "
        "variants in one run (each mode runs once per variant)",
    )
    load = parser.add_mutually_exclusive_group()
    load.add_argument("--concurrency", default=None, help="closed loop: concurrency levels, comma-separated [1,8,32]")
    load.add_argument(
        "--conversations",
        default=None,
        metavar="NxK",
        help="multi-turn: N conversations at once, K turns each, every turn resending the history; "
        "TTFT and prefix-cache hit rate per turn (use --max-tokens for each answer's length)",
    )
    load.add_argument("--rate", default=None, help="open loop: Poisson arrival rates in requests/s, comma-separated")
    load.add_argument(
        "--tenants",
        default=None,
        metavar="SPEC",
        help="multi-tenant: API keys at once, each with its own load, e.g. 'flood:rate=60,steady:rate=2:weight=3' "
        "(rate= open loop, concurrency= closed loop; weight=, tokens_per_minute=, requests_per_minute= go into "
        "the spawned server's key file; key= against --url); per-tenant TTFT, refusals, token share. Needs --duration",
    )
    parser.add_argument(
        "--tenants-alone",
        default=None,
        metavar="NAMES",
        help="--tenants: first run these tenants (comma-separated) alone, for their figures without the others",
    )
    parser.add_argument(
        "--requests", type=int, default=None, help="requests per level [closed: 4 x concurrency, at least 8]"
    )
    parser.add_argument("--duration", type=float, default=None, help="seconds per level: stop sending after this")
    parser.add_argument(
        "--ramp-up",
        type=float,
        default=0.0,
        help="closed loop: start the clients evenly over this many seconds (about one request's duration "
        "gives steady-state arrivals; with fixed lengths, clients started together arrive in bursts) [0]",
    )
    parser.add_argument(
        "--warmup", type=int, default=2, help="closed loop: warm-up requests per level, not counted [2]"
    )
    parser.add_argument(
        "--max-tokens",
        default="64",
        help="output tokens per request (ignore_eos): N, or LOW:HIGH drawn per request [64]",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="constrain every answer to a JSON schema (response_format json_schema): the structured-output workload",
    )
    parser.add_argument(
        "--task",
        choices=quoting.TASKS,
        default="chat",
        help="what the requests ask: chat (the default prompts), or answers that quote their prompt, asked "
        "greedily and ending where the model ends them: rewrite (correct a text's spelling), extract (a text "
        "to JSON, sentences verbatim), rag (quote a context's answer); where --serve-args=--speculative-tokens pays",
    )
    parser.add_argument(
        "--think-time", type=float, default=0.5, help="--conversations: seconds between a reply and the next turn [0.5]"
    )
    parser.add_argument(
        "--shared-prefix",
        action="store_true",
        help="--conversations: the same ~1,000-token system prompt (rules and tools) in front of every conversation",
    )
    parser.add_argument(
        "--own-prefix",
        action="store_true",
        help="--conversations: a ~1,000-token system prompt of its own for each conversation (many apps on one server)",
    )
    parser.add_argument(
        "--round-robin",
        action="store_true",
        help="--conversations: one request at a time, a turn of each conversation in turn, then the next turns "
        "(what the prefix cache must hold grows with N); reports the host-memory tier's share of the hits",
    )
    parser.add_argument(
        "--tools",
        choices=["auto", "required"],
        default=None,
        help="offer a tool with this tool_choice: 'required' forces a call (constrained decoding), 'auto' is the "
        "same prompt unconstrained; the tools workload",
    )
    parser.add_argument("--slo-ttft", type=float, default=None, help="goodput SLO: time to first token, seconds")
    parser.add_argument("--slo-itl", type=float, default=None, help="goodput SLO: p99 inter-token gap, seconds")
    parser.add_argument(
        "--cost-per-hour",
        type=float,
        default=None,
        help="price of the server per hour, for cost per million output tokens",
    )
    parser.add_argument(
        "--baselines",
        action="store_true",
        help="also measure in-process baselines (the batch runner without HTTP, the llama_cpp.Llama loop), "
        "each in a fresh process, and print the ratios",
    )
    parser.add_argument(
        "--cpp-baselines",
        type=Path,
        default=None,
        metavar="DIR",
        help="with --spawn and --concurrency: also measure llama.cpp's C++ llama-server (same load, same run) and "
        "llama-batched-bench's decode rate, built into DIR by tools/build-llama-baselines.sh, and print the ratios",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="with --spawn and --concurrency: measure every target this many times, all of them up at once (fresh "
        "servers each round) and each level on every target back to back, the order turned round every other "
        "round; give --cpp-baselines' ratios per round and their median; with --tenants: run the phases (alone, "
        "then together) this many times on each server, and give each --tenants-alone tenant's TTFT p99 together over alone per round and their median. On a noisy machine one target "
        "moves between runs minutes apart [1]",
    )
    parser.add_argument(
        "--server-cpus",
        default=None,
        help="with --spawn: CPUs the server may use, as taskset -c takes them (e.g. 0 or 0-1); models a container "
        "given fewer CPUs than the machine has",
    )
    parser.add_argument(
        "--noisy-neighbours",
        type=int,
        default=0,
        help="start this many CPU-bound processes beside the server for each level's load (they stop with it) [0]",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="directory for results.json/.csv/.md, requests.json and PNG plots"
    )


def run(args: argparse.Namespace) -> int:
    if args.conversations:
        return _run_conversations(args)
    if args.tenants:
        return _run_tenants(args)
    open_loop_rates = [float(r) for r in args.rate.split(",")] if args.rate else None
    levels = open_loop_rates or [int(c) for c in (args.concurrency or "1,8,32").split(",")]
    workload = Workload.from_spec(args.max_tokens, json=args.json, tools=args.tools, task=args.task)
    rows: list[dict] = []
    latencies: dict[str, list[float]] = {}
    with_cpp = bool(args.cpp_baselines and args.spawn and not open_loop_rates)
    cpp_slots = int(max(levels)) if with_cpp else None
    rounds = max(1, args.rounds) if args.spawn and not open_loop_rates else 1
    if with_cpp:
        from tokenmill.bench import cpp
    kernels_by_round: dict[int | None, dict[int, float]] = {}

    def measured(row: dict, server: SpawnedServer | None, round_number: int | None) -> None:
        if round_number is not None:
            row["round"] = round_number
        if server is not None:
            row["peak_rss_mb"] = server.peak_rss_mb()
            row["startup_s"] = server.startup_s
            print(report.table([row]).splitlines()[-1], flush=True)
        rows.append(row)

    if rounds == 1:
        for url, label, server in targets.one_at_a_time(args, cpp_slots=cpp_slots):
            for row in asyncio.run(_sweep(url, label, levels, workload, args, latencies)):
                measured(row, server, None)
    else:  # each round: every target up at once, each level on all of them back to back (targets.py)
        for round_number in range(1, rounds + 1):
            with targets.all_at_once(args, cpp_slots=cpp_slots) as spawned:
                for level in levels:
                    for url, label, server in targets.alternating(spawned, round_number):
                        (row,) = asyncio.run(_sweep(url, label, [level], workload, args, latencies))
                        measured(row, server, round_number)
            if with_cpp:  # the kernels alone in the same round, once its servers are down
                kernels_by_round[round_number] = cpp.kernel_rates(levels, workload, args)
    print(report.table(rows))
    ratios = None
    if args.baselines and not open_loop_rates:
        from tokenmill.bench.baselines import measure_baselines, ratio_table

        baselines = measure_baselines([int(level) for level in levels], args, args.baseline_settings)
        ratios = ratio_table(rows, baselines, args.baseline_settings.engine)
        print(ratios)
    if with_cpp:
        ratios = (ratios + "\n\n" if ratios else "") + cpp.compare(rows, levels, workload, args, kernels_by_round)
        print(ratios)
    if args.out:
        report.write(rows, args.out)
        (args.out / "requests.json").write_text(json.dumps(latencies))
        if ratios:
            (args.out / "ratios.md").write_text(ratios + "\n")
        from tokenmill.bench.plots import plot_all

        plot_all(rows, latencies, args.out)
        print(f"wrote results to {args.out}/")
    return 0


def _run_conversations(args: argparse.Namespace) -> int:
    from tokenmill.bench import conversations

    spec = conversations.Conversations.from_spec(
        args.conversations,
        max_tokens=int(args.max_tokens.partition(":")[0]),
        think_time=args.think_time,
        shared_prefix=args.shared_prefix,
        own_prefix=args.own_prefix,
        round_robin=args.round_robin,
    )

    async def measure(url: str, label: str) -> list[dict]:
        model = await served_model(url)
        records, seconds = await conversations.run_conversations(url, model, spec)
        return conversations.per_turn_rows(label, records, seconds)

    rows: list[dict] = []
    for url, label, server in targets.one_at_a_time(args):
        measured = asyncio.run(measure(url, label))
        if server is not None:
            measured[-1]["peak_rss_mb"] = server.peak_rss_mb()
            print(conversations.table(measured), flush=True)
        rows += measured
    _write_rows(args.out, "conversations", conversations.table(rows), rows)
    return 0


def _write_rows(out: Path | None, name: str, table: str, rows: list[dict]) -> None:
    """Print a workload's table, and write it and its rows under `out` (NAME.md, NAME.json)."""
    print(table)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{name}.md").write_text(table + "\n")
        (out / f"{name}.json").write_text(json.dumps(rows, indent=2))
        print(f"wrote results to {out}/")


def _run_tenants(args: argparse.Namespace) -> int:
    import tempfile

    from tokenmill.bench import tenants

    loads = tenants.parse_tenants(args.tenants)
    alone = [name for name in (args.tenants_alone or "").split(",") if name]
    if unknown := set(alone) - {load.name for load in loads}:
        raise SystemExit(f"tokenmill bench: --tenants-alone names no tenant of --tenants: {', '.join(sorted(unknown))}")
    if not args.duration:
        raise SystemExit("tokenmill bench: --tenants needs --duration (seconds per phase)")
    workload = Workload.from_spec(args.max_tokens)

    rounds = max(1, args.rounds)
    rows: list[dict] = []
    requests: list[dict] = []  # every request of every phase, for tenants-requests.json

    async def measure(url: str, label: str) -> None:
        """Every round on the same server, the alone phases then the together one: a later round
        meets what the earlier ones left behind (cached prompts, a grown KV cache) in both."""
        model = await served_model(url, loads[0].headers)
        await tenants.warm_up(url, model, workload, loads)
        for round_number in range(1, rounds + 1):
            phases = [("alone", [load for load in loads if load.name == name]) for name in alone]
            for phase, phase_loads in [*phases, ("together", loads)]:
                per_tenant = await tenants.run_tenants(url, model, workload, phase_loads, args.duration)
                where = {"target": label, "phase": phase} | ({"round": round_number} if rounds > 1 else {})
                measured = [row | where for row in tenants.tenant_rows(label, phase, per_tenant, args.duration)]
                print("\n".join(tenants.table(measured).splitlines()[2:]), flush=True)
                rows.extend(measured)
                requests.extend(tenants.request_rows(where, per_tenant))

    with tempfile.TemporaryDirectory() as folder:
        key_file = tenants.write_key_file(loads, Path(folder) / "keys")
        for url, label, _ in targets.one_at_a_time(args, extra_flags=["--api-key-file", str(key_file)]):
            asyncio.run(measure(url, label))
    summary = tenants.alone_ratios(rows)
    _write_rows(args.out, "tenants", tenants.table(rows) + (f"\n\n{summary}" if summary else ""), rows)
    if args.out:  # every request, to see when the slow ones came
        (args.out / "tenants-requests.json").write_text(json.dumps(requests))
    return 0


async def _sweep(
    url: str, label: str, levels: list, workload: Workload, args: argparse.Namespace, latencies: dict
) -> list[dict]:
    model = await served_model(url)
    rows = []
    async with httpx.AsyncClient(base_url=url) as metrics_client:
        for level in levels:
            before = await scrape_lag_buckets(metrics_client)
            neighbours = NoisyNeighbours(args.noisy_neighbours)
            try:
                with OwnLoopLag() as own_lag:
                    if args.rate:
                        records, seconds = await open_loop(
                            url, model, workload, level, args.requests, duration=args.duration
                        )
                    else:
                        requests = args.requests or (None if args.duration else max(8, 4 * level))
                        warmup = min(args.warmup, level) if args.warmup else 0
                        records, seconds = await closed_loop(
                            url,
                            model,
                            workload,
                            level,
                            requests,
                            warmup=warmup,
                            duration=args.duration,
                            ramp_up=args.ramp_up,
                        )
                server_lag = lag_p99(before, await scrape_lag_buckets(metrics_client))
            finally:
                neighbours.stop()
            summary = summarize(records, seconds, args.slo_ttft, args.slo_itl)
            target = label + (f" +{args.noisy_neighbours} busy" if args.noisy_neighbours else "")
            row = {
                "target": target,
                ("rate" if args.rate else "concurrency"): level,
                **summary.as_row(),
                "server_loop_lag_p99": server_lag,
                "client_loop_lag_max": own_lag.worst,
            }
            if args.cost_per_hour is not None and summary.output_tokens_per_s > 0:
                row["cost_per_million_tokens"] = args.cost_per_hour / (summary.output_tokens_per_s * 3600) * 1e6
            rows.append(row)
            # every round's requests of a target together
            measured = latencies.get(f"{target} @ {level}", []) + [r.latency for r in records if r.latency is not None]
            latencies[f"{target} @ {level}"] = sorted(measured)
    return rows


class NoisyNeighbours:
    """CPU-bound processes that spin beside the server while a level runs (bounded: 15 minutes)."""

    def __init__(self, count: int):
        busy = "import time\nend = time.time() + 900\nwhile time.time() < end:\n    pass\n"
        self._processes = [subprocess.Popen([sys.executable, "-c", busy]) for _ in range(count)]

    def stop(self) -> None:
        for process in self._processes:
            process.kill()
            process.wait()
        self._processes = []
