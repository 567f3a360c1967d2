"""Shared fixtures: an in-process app over ASGI, and a real `tokenmill serve` process."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager

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
    _pin_to_this_workers_cores()


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`-n auto` (pyproject's addopts): two workers per usable core (affinity and cgroup quota, as
    the server counts them), at most 8 (each loads its own models). A worker pinned to one core
    runs its engines on one thread, which spins at no barrier, so two share a core as any two
    processes do; while one waits on a server, a timeout or a sleep, the other computes."""
    from tokenmill.cpus import available_cpus

    return min(8, 2 * available_cpus())


# The modules that take longest, started first: a long module started last would run on alone
# while the other workers sit idle (`--dist loadfile` hands modules out in collection order).
# Only the order of the run changes; every module is independent of the others.
LONGEST_FIRST = (
    "tests/e2e/test_openai_surface.py",
    "tests/engines/test_engine_contract.py",
    "tests/deploy/test_ray_serve.py",
    "tests/engines/test_torch.py",
    "tests/engines/test_speculative_engines.py",
    "tests/e2e/test_responses_sdk.py",
    "tests/runners/test_prefix_cache_pressure.py",
    "tests/reliability/test_drain_and_disconnects.py",
    "tests/server/test_errors.py",
    "tests/e2e/test_anthropic_sdk.py",
    "tests/e2e/test_shutdown_and_disconnect.py",
    "tests/reliability/test_fuzz_schema.py",
    "tests/test_code_quality.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))


def _pin_to_this_workers_cores() -> None:
    """Under pytest-xdist, each worker runs on its own share of the cores, and so do the servers
    and engines it starts (they inherit the affinity and size their threads by it): llama.cpp's
    threads meet at spinning barriers, and two workers' engines on the same cores slow each other
    down many times over (tests/reliability/test_noisy_neighbour.py)."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if worker is None or count < 2 or _ALL_CPUS is None:  # no affinity to set off Linux: not pinned
        return
    cpus = sorted(_ALL_CPUS)
    index = int(worker.removeprefix("gw"))
    if count >= len(cpus):  # a core each, taken in turn
        share = [cpus[index % len(cpus)]]
    else:
        share = cpus[index * len(cpus) // count : (index + 1) * len(cpus) // count]
    _set_affinity(share)


@contextmanager
def unpinned() -> Iterator[None]:
    """Every core for what starts inside (a Ray cluster's dozen processes, polling one another, crawl
    on a single shared core), then this worker's share again."""
    if _ALL_CPUS is None:
        yield
        return
    share = os.sched_getaffinity(0)
    _set_affinity(_ALL_CPUS)
    try:
        yield
    finally:
        _set_affinity(share)


# before any pinning (conftest is imported first); None where the OS has no affinity calls
_ALL_CPUS = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None


def _set_affinity(cpus) -> None:
    for thread in os.listdir("/proc/self/task"):  # every thread already running, not only this one
        try:
            os.sched_setaffinity(int(thread), cpus)
        except ProcessLookupError:  # it ended meanwhile
            pass


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
