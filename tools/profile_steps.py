"""Where the batch engine's time goes, per concurrency: py-spy samples of the engine process and the
server process under the bench's closed-loop load, grouped into model, sampling, scheduling,
detokenising, transport and the HTTP side.

    python tools/profile_steps.py --engine llamacpp --concurrency 1,8,32 --seconds 20

Needs py-spy (in tokenmill's bench extras) and permission to read another process's memory (root, or
ptrace_scope 0). Prints one markdown table: the share of samples per group, for each process and level.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import subprocess
import sys
import tempfile
from pathlib import Path

from tokenmill.bench.loadgen import closed_loop, served_model
from tokenmill.bench.spawn import SpawnedServer, worker_pids
from tokenmill.bench.workload import Workload

# (group, any of these in a frame): the first group, in this order, that any frame of a sample's
# stack names decides its group (the stack's outer frames, the loops, are in every sample)
GROUPS = [
    (
        "sampling",
        ("sampler.py", "llama_sampler", "logprobs.py", "structured.py", "draws.py", "_sampling.py"),
    ),
    ("detokenise + stop strings", ("sequence.py", "stopping.py")),
    ("prefix cache", ("prefix_cache.py", "llama_memory_seq")),
    ("scheduler", ("scheduler.py",)),
    ("model: llama_decode", ("llama_decode",)),
    ("model: torch forward", ("torchlm/model.py", "torchlm/linear.py", "torchlm/kv_cache.py")),
    ("engine: step plumbing", ("engine_core.py", "torchlm/engine.py", "llamacpp.py")),
    ("idle (waiting for work)", ("poll (", "wait (", "select (", "epoll")),
    ("transport (pipe, pickling)", ("connection.py", "engine_worker.py", "engine_process.py", "pickle")),
    ("SSE + streams", ("streams.py", "sse.py", "responses.py")),
    ("admission + serving", ("admission.py", "serving.py", "deadlines.py")),
    ("tokenise + chat template", ("chat_template.py", "tokenizer", "jinja2")),
    ("HTTP (uvicorn, starlette, pydantic)", ("uvicorn", "starlette", "fastapi", "pydantic", "h11", "httptools")),
    ("event loop", ("asyncio", "selectors", "uvloop")),
]


def group_of(stack: list[str]) -> str:
    for group, needles in GROUPS:
        if any(needle in frame for frame in stack for needle in needles):
            return group
    return "other"


def read_samples(path: Path) -> collections.Counter[str]:
    """py-spy's raw (collapsed) output: 'frame;frame;...;frame count' per line."""
    groups: collections.Counter[str] = collections.Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack:
            groups[group_of(stack.split(";"))] += int(count)
    return groups


def record(pid: int, seconds: float, out: Path, idle: bool) -> subprocess.Popen:
    command = ["py-spy", "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "100"]
    command += ["--format", "raw", "--output", str(out), "--native", *(["--idle"] if idle else [])]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def profile_level(server: SpawnedServer, level: int, seconds: float, folder: Path) -> dict[str, collections.Counter]:
    engine = worker_pids(server.process.pid)[0]
    outputs = {"engine": folder / f"engine-{level}.txt", "server": folder / f"server-{level}.txt"}
    # the engine counted with its idle time (how often it waits for work), the server by its busy time
    recorders = [
        record(engine, seconds, outputs["engine"], True),
        record(server.process.pid, seconds, outputs["server"], False),
    ]

    async def load() -> None:
        model = await served_model(server.url)
        await closed_loop(server.url, model, Workload(max_tokens=64), level, None, duration=seconds + 2)

    asyncio.run(load())
    for recorder in recorders:
        recorder.wait()
    return {name: read_samples(path) for name, path in outputs.items()}


def table(results: dict[tuple[str, int], collections.Counter]) -> str:
    columns = sorted(results)
    names = [f"{process} @{level}" for process, level in columns]
    lines = ["| group | " + " | ".join(names) + " |", "|---|" + "---|" * len(columns)]
    totals = {column: sum(results[column].values()) or 1 for column in columns}
    used = [group for group, _ in GROUPS] + ["other"]
    for group in used:
        shares = [100 * results[column][group] / totals[column] for column in columns]
        if any(share >= 0.5 for share in shares):
            lines.append(f"| {group} | " + " | ".join(f"{share:.0f}%" for share in shares) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", default="llamacpp", choices=["llamacpp", "torch"])
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--seconds", type=float, default=20.0, help="seconds of load (and of sampling) per level")
    parser.add_argument("--serve-args", default="", help="extra `tokenmill serve` flags, quoted")
    args = parser.parse_args()
    results: dict[tuple[str, int], collections.Counter] = {}
    with tempfile.TemporaryDirectory() as folder:
        flags = ["--mode", "batch", "--engine", args.engine, *args.serve_args.split()]
        with SpawnedServer(flags) as server:
            for level in (int(c) for c in args.concurrency.split(",")):
                for process, groups in profile_level(server, level, args.seconds, Path(folder)).items():
                    results[(process, level)] = groups
                print(f"profiled concurrency {level}", file=sys.stderr, flush=True)
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
