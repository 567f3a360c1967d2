"""Shared pieces of the reliability suite: one request's outcome, the nothing-lost rule, server vitals.

Short by default (CI); `pytest --long` or TOKENMILL_LONG=1 runs the full loads and the soak.
With TOKENMILL_RELIABILITY_REPORT=FILE every scenario appends one JSON line of results to FILE;
`python -m tests.reliability.report FILE` turns them into the table in docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from tokenmill.bench.spawn import worker_pids

ALL_MODES = ["sync", "async", "process", "batch"]
# Capacity 2 in the replica modes (two one-thread replicas of the default model), 4 in batch mode.
MODE_FLAGS = {
    "sync": ["--replicas", "2", "--threads", "1"],
    "async": ["--replicas", "2", "--threads", "1"],
    "process": ["--replicas", "2", "--threads", "1"],
    "batch": ["--max-batch", "4"],
}
CAPACITY = {"sync": 2, "async": 2, "process": 2, "batch": 4}
CHAT = [{"role": "user", "content": "Write a few sentences about rivers."}]


def long_mode() -> bool:
    return os.environ.get("TOKENMILL_LONG") == "1"


# The loads run in every mode with --long; in CI in the two whose machinery is most their own:
# worker processes (process) and the supervised engine process (batch, the default). The thread
# patterns (sync, async) share the replicas' code with process mode, and the API suite
# (tests/server) runs all four on every request shape.
MODES = ALL_MODES if long_mode() else ["process", "batch"]


@dataclass
class Outcome:
    status: int | None = None
    text: str = ""
    completion_tokens: int | None = None
    finish: str | None = None
    error: dict | None = None
    done: bool = False
    retry_after: str | None = None
    ttft: float | None = None
    dropped: bool = False  # the client left on purpose
    exception: str | None = None  # transport-level failure (hang-up, timeout): must never happen

    @property
    def completed(self) -> bool:
        return self.status == 200 and self.done and self.error is None and self.finish is not None

    @property
    def refused(self) -> bool:
        return self.status == 503 and bool(self.retry_after)


async def stream_chat(client: httpx.AsyncClient, max_tokens: int, drop_after: int | None = None) -> Outcome:
    """One streamed chat completion with usage; `drop_after` N text chunks, the client hangs up."""
    body = {
        "messages": CHAT,
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    outcome = Outcome()
    started = time.monotonic()
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            outcome.status = response.status_code
            outcome.retry_after = response.headers.get("retry-after")
            if response.status_code != 200:
                await response.aread()
                try:
                    outcome.error = response.json().get("error")
                except ValueError:
                    outcome.error = {"message": response.text[:200]}
                return outcome
            chunks = 0
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    outcome.done = True
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    outcome.error = event["error"]
                    continue
                if event.get("usage"):
                    outcome.completion_tokens = event["usage"]["completion_tokens"]
                for choice in event.get("choices") or []:
                    piece = choice["delta"].get("content") or ""
                    if piece:
                        outcome.ttft = outcome.ttft or time.monotonic() - started
                        outcome.text += piece
                        chunks += 1
                    outcome.finish = choice.get("finish_reason") or outcome.finish
                if drop_after is not None and chunks >= drop_after:
                    outcome.dropped = True
                    return outcome  # leaving the block closes the connection mid-stream
    except httpx.HTTPError as error:
        outcome.exception = f"{type(error).__name__}: {error}"
    return outcome


@dataclass
class Tally:
    completed: int = 0
    refused: int = 0
    errored: int = 0  # ended with an explicit error event or a clear 4xx/5xx body
    dropped: int = 0
    lost: int = 0  # anything else: a 500, a cut stream, a wrong length, a transport failure
    lost_examples: list[str] = field(default_factory=list)

    def add(self, outcome: Outcome, max_tokens: int | None) -> None:
        if outcome.dropped:
            self.dropped += 1
        elif outcome.completed and (max_tokens is None or outcome.completion_tokens == max_tokens):
            self.completed += 1
        elif outcome.refused:
            self.refused += 1
        elif outcome.error is not None and (
            outcome.done or (outcome.status or 500) < 500 or outcome.status in (502, 503, 504)
        ):
            self.errored += 1
        else:
            self.lost += 1
            if len(self.lost_examples) < 3:
                self.lost_examples.append(repr(outcome)[:300])


def tally_of(outcomes: list[Outcome], max_tokens: int | None) -> Tally:
    tally = Tally()
    for outcome in outcomes:
        tally.add(outcome, max_tokens)
    return tally


def record(scenario: str, mode: str, load: str, injected: str, tally: Tally, **extra) -> None:
    """Append this scenario's result to the report file, if one was asked for."""
    path = os.environ.get("TOKENMILL_RELIABILITY_REPORT")
    if not path:
        return
    row = {
        "scenario": scenario,
        "mode": mode,
        "load": load,
        "injected": injected,
        "long": long_mode(),
        **{k: v for k, v in asdict(tally).items() if k != "lost_examples"},
        **extra,
    }
    with Path(path).open("a") as f:
        f.write(json.dumps(row) + "\n")


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.MULTILINE)
    assert match, f"{name} missing from /metrics"
    return float(match.group(1))


@dataclass(frozen=True)
class Vitals:
    rss_mb: float
    fds: int
    threads: int


def vitals(pid: int) -> Vitals:
    """The server's resident memory, open files and threads, its worker processes included."""
    pids = [pid, *worker_pids(pid)]
    rss = fds = threads = 0
    for p in pids:
        try:
            status = Path(f"/proc/{p}/status").read_text()
            rss += int(re.search(r"VmRSS:\s+(\d+)", status).group(1))
            threads += int(re.search(r"Threads:\s+(\d+)", status).group(1))
            fds += len(os.listdir(f"/proc/{p}/fd"))
        except (OSError, AttributeError):
            continue
    return Vitals(rss / 1024, fds, threads)
