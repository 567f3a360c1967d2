"""Faults in the batch engine, injected for real into a running server: a SIGSEGV in the engine
process, an exception after the engine's step, a crash loop, and a warm-up that fails.

The simulated engine fires its fault at its Nth step (its warm-up is steps 1 and 2), counted anew
in every engine it builds, so each restarted engine would fault again at the same step.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time

import httpx
import pytest

from tests.reliability.harness import Tally, record, stream_chat, tally_of
from tokenmill.bench.spawn import SpawnedServer, worker_pids

SIM = ["--engine", "simulated", "--mode", "batch", "--sim-ttft-ms", "2", "--sim-itl-ms", "8", "--max-batch", "8"]


def restarts(metrics_text: str) -> dict[str, float]:
    return {
        m[1]: float(m[2])
        for m in re.finditer(r'^tokenmill_engine_restarts_total\{reason="([^"]+)"\} (\S+)$', metrics_text, re.MULTILINE)
    }


class ReadyWatch:
    """Polls /ready every 20 ms; when it first says 503, sends one request to see how it is refused."""

    def __init__(self, client: httpx.AsyncClient):
        self.client = client
        self.states: list[int] = []
        self.refused: httpx.Response | None = None
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            status = (await self.client.get("/ready")).status_code
            if status == 503 and self.refused is None:
                body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
                reply = await self.client.post("/v1/chat/completions", json=body)
                if (await self.client.get("/ready")).status_code == 503:  # still restarting: it counts
                    self.refused = reply
            if not self.states or self.states[-1] != status:
                self.states.append(status)
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass


@pytest.mark.parametrize(
    "fault, reason",
    [
        pytest.param("crash", "SIGSEGV", id="sigsegv-in-engine-step"),
        pytest.param("bad_token", "exception", id="exception-after-the-step"),
    ],
)
async def test_an_engine_fault_under_load_ends_every_stream_explicitly_and_the_engine_comes_back(
    serve_process, fault, reason
):
    server = serve_process(*SIM, "--sim-fault", fault, "--sim-fault-at-step", "40")
    engine_before = worker_pids(server.process.pid)
    max_tokens = 60  # the fault fires about 37 tokens into these streams
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        watch = ReadyWatch(client)
        outcomes = await asyncio.gather(*(stream_chat(client, max_tokens) for _ in range(4)))
        failed_at = time.monotonic()
        while watch.states[-1] != 200 or len(watch.states) < 3:
            assert time.monotonic() - failed_at < 20, f"/ready never came back: {watch.states}"
            await asyncio.sleep(0.02)
        back = time.monotonic() - failed_at
        await watch.stop()
        after = await asyncio.gather(*(stream_chat(client, 8) for _ in range(3)))
        metrics = (await client.get("/metrics")).text
    assert server.process.poll() is None  # the server survived its engine
    tally = tally_of(outcomes, max_tokens)
    record(
        "engine fault",
        "batch (simulated engine)",
        "4 streams of 60 tokens",
        f"{fault} at the engine's step 40",
        tally,
        ready_again_s=round(back, 2),
    )
    assert tally.lost == 0 and tally.errored == 4  # every stream: text, then an error event, then [DONE]
    for outcome in outcomes:
        assert outcome.text and outcome.done and outcome.error["code"] == "engine_restarting"
    assert watch.states[:3] == [200, 503, 200]  # ready, restarting, ready again
    assert watch.refused is not None and watch.refused.status_code == 503
    assert watch.refused.json()["error"]["code"] == "engine_restarting" and watch.refused.headers["retry-after"]
    assert all(o.completed and o.completion_tokens == 8 for o in after)  # served normally again
    assert restarts(metrics) == {reason: 1.0}
    assert worker_pids(server.process.pid) != engine_before  # a new engine process


async def test_the_engine_fault_reaches_streams_within_a_second(serve_process):
    server = serve_process(*SIM, "--sim-fault", "crash", "--sim-fault-at-step", "30", "--sim-itl-ms", "5")
    gaps = []

    async def timed_stream(client: httpx.AsyncClient) -> None:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100, "ignore_eos": True, "stream": True}
        last = time.monotonic()
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            async for line in response.aiter_lines():
                if '"error"' in line:
                    gaps.append(time.monotonic() - last)
                elif line.startswith("data: {"):
                    last = time.monotonic()

    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        await asyncio.gather(*(timed_stream(client) for _ in range(3)))
    # The engine steps every 5 ms: the time from the last token to the error event is the time
    # the server took to notice the crash and end the stream.
    assert len(gaps) == 3 and max(gaps) < 1.0, gaps


async def test_a_crash_loop_ends_the_server_with_a_non_zero_exit(serve_process):
    server = serve_process(*SIM, "--sim-fault", "crash", "--sim-fault-at-step", "3", "--engine-restart-limit", "2")
    outcomes = []
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        deadline = time.monotonic() + 30
        while server.process.poll() is None and time.monotonic() < deadline:
            outcome = await stream_chat(client, 4)
            if outcome.exception is None:  # the last ones meet a server that has closed its port
                outcomes.append(outcome)
            await asyncio.sleep(0.05)
    exit_code = server.process.wait(timeout=15)
    tally = tally_of(outcomes, 4)
    record(
        "crash loop",
        "batch (simulated engine)",
        "one request at a time",
        "SIGSEGV at every engine's first step",
        tally,
        exit_code=exit_code,
    )
    assert exit_code != 0
    log = server.output()
    assert log.count("giving up so that the orchestrator can replace this server") == 1
    assert "failed 3 times within 60s" in log
    assert tally.lost == 0 and tally.errored >= 3  # each crash ended its request with an error event
    assert all(o.error["code"] == "engine_restarting" for o in outcomes)


@pytest.mark.parametrize("fault, words", [("crash", "SIGSEGV"), ("raise", "simulated engine fault at step 1")])
def test_start_up_fails_cleanly_when_the_warm_up_decode_fails(fault, words):
    server_cmd = [
        sys.executable,
        "-m",
        "tokenmill",
        "serve",
        "--port",
        "0",
        *SIM,
        "--sim-fault",
        fault,
        "--sim-fault-at-step",
        "1",
    ]
    done = subprocess.run(server_cmd, capture_output=True, text=True, timeout=60)
    log = done.stdout + done.stderr
    record(
        "warm-up fails",
        "batch (simulated engine)",
        "none",
        f"{fault} in the warm-up decode",
        Tally(),
        exit_code=done.returncode,
    )
    assert done.returncode != 0
    fatal = [line for line in log.splitlines() if "could not start its model engine" in line]
    assert len(fatal) == 1 and words in fatal[0], log[-2000:]
    assert "Uvicorn running" not in log  # the port never opened, so /ready never said 200


async def test_the_in_thread_engine_also_recovers_from_an_exception(serve_process):
    server = serve_process(*SIM, "--no-engine-process", "--sim-fault", "raise", "--sim-fault-at-step", "20")
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        first = await asyncio.gather(*(stream_chat(client, 40) for _ in range(3)))
        failed_at = time.monotonic()
        for _ in range(200):
            if (await client.get("/ready")).status_code == 200:
                break
            await asyncio.sleep(0.02)
        back = time.monotonic() - failed_at
        after = await stream_chat(client, 5)
        metrics = (await client.get("/metrics")).text
    tally = tally_of(first, 40)
    record(
        "engine fault",
        "batch --no-engine-process (simulated engine)",
        "3 streams of 40 tokens",
        "raise at the engine's step 20",
        tally,
        ready_again_s=round(back, 2),
    )
    assert tally.lost == 0 and all(o.error and o.done for o in first)
    assert after.completed
    assert restarts(metrics) == {"exception": 1.0}


def test_spawned_server_counts_the_engine_process_in_its_memory():
    with SpawnedServer(SIM) as server:
        assert len(worker_pids(server.process.pid)) == 1  # the engine process
        assert server.peak_rss_mb() > 0


@pytest.mark.parametrize("sig", [signal.SIGSEGV, signal.SIGKILL], ids=["SIGSEGV", "SIGKILL (as the OOM killer)"])
async def test_the_default_model_engine_killed_under_load_is_contained(serve_process, sig):
    # The real engine process (llama.cpp, default model) takes a real signal from outside.
    server = serve_process("--mode", "batch", "--max-batch", "4")
    (engine,) = worker_pids(server.process.pid)
    max_tokens = 64
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
        load = [asyncio.ensure_future(stream_chat(client, max_tokens)) for _ in range(4)]
        await asyncio.sleep(0.5)  # all four mid-generation (64 tokens take about 1.5 s here)
        os.kill(engine, sig)
        killed = time.monotonic()
        outcomes = await asyncio.gather(*load)
        ended = time.monotonic() - killed
        while (await client.get("/ready")).status_code != 200:
            assert time.monotonic() - killed < 30
            await asyncio.sleep(0.02)
        back = time.monotonic() - killed
        after = await asyncio.gather(*(stream_chat(client, 8) for _ in range(2)))
        metrics = (await client.get("/metrics")).text
    tally = tally_of(outcomes, max_tokens)
    record(
        "engine killed",
        "batch",
        "4 streams of 64 tokens, default model",
        f"kill -{sig.name[3:]} of the engine process",
        tally,
        streams_ended_s=round(ended, 2),
        ready_again_s=round(back, 2),
    )
    assert tally.lost == 0 and tally.errored == 4
    assert ended < 1.0 and all(o.completed for o in after)
    assert restarts(metrics) == {sig.name: 1.0}
