"""Shared fixtures: an in-process app over ASGI, and a real `tokenmill serve` process."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager

import httpx
import pytest

from tokenmill.bench.spawn import SpawnedServer
from tokenmill.config import Settings
from tokenmill.server import create_app

# The unit-level API suite pins a mode (async unless a test says otherwise), so the default can change.
FAST_SIM = {"engine": "simulated", "mode": "async", "sim_ttft_ms": 2, "sim_itl_ms": 1}


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


@pytest.fixture
def serve_process() -> Iterator[Callable[..., SpawnedServer]]:
    """Start real `tokenmill serve` processes on 127.0.0.1; all are stopped after the test."""
    started: list[SpawnedServer] = []

    def start(*args: str) -> SpawnedServer:
        server = SpawnedServer(list(args), log_level="info")
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--long", action="store_true", help="run the reliability suite's full loads and the soak")


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--long"):
        os.environ["TOKENMILL_LONG"] = "1"


def _skips_fail() -> bool:
    """Under CI (CI=true), where the README's test command installs every extra, nothing may skip:
    a missing extra or a skipped test is a failure, with the skip's reason."""
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and _skips_fail():
        report.outcome = "failed"
        report.longrepr = f"skipped under CI, where nothing may skip: {report.longrepr}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and _skips_fail():  # a module-level importorskip
        report.outcome = "failed"
        report.longrepr = f"skipped under CI, where nothing may skip: {report.longrepr}"
