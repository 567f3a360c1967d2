"""Injected faults: a worker process killed under load, and an upstream that misbehaves every way it can."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx
import pytest

from tests.conftest import asgi_client
from tests.reliability.harness import Tally, metric, record, stream_chat, tally_of, worker_pids
from tokenmill.config import Settings


@pytest.mark.slow
async def test_killing_a_worker_under_load_fails_only_its_requests(serve_process):
    server = serve_process("--mode", "process", "--replicas", "2", "--threads", "1", "--max-queue", "16")
    max_tokens = 48
    async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
        load = [asyncio.ensure_future(stream_chat(client, max_tokens)) for _ in range(8)]
        while metric((await client.get("/metrics")).text, "tokenmill_in_flight_requests") < 2:
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)  # both workers mid-generation, six requests queued
        os.kill(worker_pids(server.process.pid)[0], signal.SIGKILL)
        outcomes = await asyncio.gather(*load)
        await asyncio.sleep(1.0)
        again = await asyncio.gather(*(stream_chat(client, 8) for _ in range(4)))
    tally = tally_of(outcomes, max_tokens)
    record("worker killed", "process", "8 streams on 2 worker processes", "kill -9 of one worker", tally)
    assert tally.lost == 0
    assert tally.errored == 1 and tally.completed == 7  # only the request on the killed worker failed
    failed = next(o for o in outcomes if o.error)
    assert "died" in failed.error["message"] and failed.done
    assert all(o.completed for o in again)  # capacity came back


class FakeUpstream:
    """A raw TCP server that answers like a broken OpenAI-compatible API, in one of several ways."""

    def __init__(self, behaviour: str):
        self.behaviour = behaviour
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc) -> None:
        self.server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        if self.behaviour == "stall":
            await asyncio.sleep(3600)
        head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n"
        if self.behaviour == "reset":
            chunk = b'data: {"choices":[{"index":0,"delta":{"content":"Hel"},"finish_reason":null}]}\n\n'
            writer.write(head + chunk)
            await writer.drain()
            await asyncio.sleep(0.1)
            writer.transport.abort()  # RST mid-stream
            return
        if self.behaviour == "garbage":
            writer.write(head + b"data: {this is not json\n\n")
            await writer.drain()
        writer.close()


def _front(url: str) -> Settings:
    return Settings(
        engine="upstream",
        upstream_url=url,
        upstream_model="m",
        upstream_attempts=2,
        first_token_timeout=1.5,
        upstream_connect_timeout=1.0,
    )


UPSTREAM_FAULTS = {
    # behaviour: (non-streamed status, error code)
    "refuse": (502, "upstream_unreachable"),
    "reset": (502, "upstream_unreachable"),
    "stall": (504, "first_token_timeout"),
    "garbage": (502, "upstream_bad_response"),
}


@pytest.mark.parametrize("behaviour", list(UPSTREAM_FAULTS))
async def test_upstream_faults_become_clear_errors_without_hanging(behaviour):
    status, code = UPSTREAM_FAULTS[behaviour]
    async with FakeUpstream(behaviour) as url:
        if behaviour == "refuse":
            url = f"http://127.0.0.1:{_closed_port()}"
        async with asgi_client(_front(url)) as client:
            started = time.monotonic()
            reply = await client.post(
                "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
            )
            streamed = await stream_chat(client, 4)
            elapsed = time.monotonic() - started
    tally = Tally()
    tally.add(streamed, 4)
    record(
        "upstream fault",
        "async (upstream)",
        "1 plain + 1 streamed request",
        behaviour,
        tally,
        status=reply.status_code,
        code=reply.json()["error"]["code"],
    )
    assert reply.status_code == status and reply.json()["error"]["code"] == code
    assert streamed.error is not None and streamed.error["code"] == code and tally.lost == 0
    assert elapsed < 8  # bounded by the timeouts (1.5 s first token, 2 attempts), never a hang


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
async def test_a_worker_that_cannot_restart_is_retried_and_capacity_tells_the_truth(serve_process, tmp_path):
    # The worker's model file disappears, then a worker is killed: its restarts fail until the file
    # is back. Meanwhile capacity is one, /ready says so, and the server keeps serving on the other.
    import shutil

    from tokenmill.engines.model_files import default_model_path

    model = tmp_path / "model.gguf"
    shutil.copy(default_model_path(), model)
    server = serve_process("--mode", "process", "--replicas", "2", "--threads", "1", "--model", str(model))

    async def capacity(client: httpx.AsyncClient) -> float:
        return metric((await client.get("/metrics")).text, "tokenmill_capacity")

    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
        assert await capacity(client) == 2
        model.rename(tmp_path / "moved.gguf")
        os.kill(worker_pids(server.process.pid)[0], signal.SIGKILL)
        deadline = time.monotonic() + 20
        while "restart_failed" not in (text := (await client.get("/metrics")).text):
            assert time.monotonic() < deadline, "the failed restart was never retried"
            await asyncio.sleep(0.05)
        assert metric(text, "tokenmill_capacity") == 1
        ready = await client.get("/ready")
        assert ready.status_code == 200 and ready.json()["capacity"] == 1  # one worker still serves
        short = await stream_chat(client, 8)
        (tmp_path / "moved.gguf").rename(model)
        restored = time.monotonic()
        while await capacity(client) < 2:
            assert time.monotonic() < deadline + 20, "the worker never came back"
            await asyncio.sleep(0.1)
        back = time.monotonic() - restored
        again = await asyncio.gather(*(stream_chat(client, 8) for _ in range(2)))
    tally = tally_of([short, *again], 8)
    record(
        "worker cannot restart",
        "process",
        "3 streams, one while short",
        "model file moved away, one worker killed",
        tally,
        worker_back_after_restore_s=round(back, 2),
    )
    assert short.completed and all(o.completed for o in again)
    assert server.process.poll() is None
