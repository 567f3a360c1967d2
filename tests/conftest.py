"""Shared fixtures: an in-process app over ASGI, and a real `tokenmill serve` process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager

import httpx
import pytest

from tokenmill.config import Settings
from tokenmill.server import create_app

FAST_SIM = {"engine": "simulated", "sim_ttft_ms": 2, "sim_itl_ms": 1}


def sim_settings(**overrides) -> Settings:
    return Settings(**{**FAST_SIM, **overrides})


@asynccontextmanager
async def asgi_client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client talking to the app in-process, with the app's lifespan (runner) running."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://tokenmill.test") as client:
            yield client


@pytest.fixture(params=["sync", "async", "process", "batch"])
async def client(request) -> AsyncIterator[httpx.AsyncClient]:
    """The API suite runs once per serving pattern: every mode must behave the same."""
    async with asgi_client(sim_settings(mode=request.param)) as c:
        yield c


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A real `python -m tokenmill serve` on 127.0.0.1; stopped (and reaped) by the fixture."""

    def __init__(self, args: list[str], startup_timeout: float = 120.0):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "tokenmill", "serve", "--host", "127.0.0.1", "--port", str(self.port), *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ})
        self._wait_ready(startup_timeout)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.output()}")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server not ready after {timeout}s:\n{self.output()}")

    def output(self) -> str:
        if self.proc.stdout and self.proc.poll() is not None:
            return self.proc.stdout.read().decode(errors="replace")
        return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def serve_process() -> Iterator[Callable[..., ServerProcess]]:
    started: list[ServerProcess] = []

    def start(*args: str) -> ServerProcess:
        server = ServerProcess(list(args))
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
