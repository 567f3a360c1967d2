"""tokenmill on a local Ray cluster: replicas behind Ray Serve's proxy, and what Ray does with
tokenmill's capacity, drain and health (the simulated engine keeps those redeployments quick)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

import httpx
from openai import AsyncOpenAI

from tests.conftest import unpinned
from tokenmill.config import Settings
from tokenmill.deploy.ray import RayOptions, build_application, deployment_options

pytestmark = pytest.mark.slow  # Ray start-up and two model loads (~15 s here); runs in CI too


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_url():
    port = _free_port()
    with unpinned():  # the cluster's processes get every core, and so do the actors they start
        ray.init(
            num_cpus=2, include_dashboard=False, address="local", log_to_driver=False, _node_ip_address="127.0.0.1"
        )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        settings = Settings(mode="async", threads=1, context_window=1024, max_queue=8)
        serve.run(build_application(settings, RayOptions(num_replicas=2)), name="tokenmill", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


async def test_streams_through_ray_and_spreads_over_both_replicas(ray_url):
    async with AsyncOpenAI(base_url=f"{ray_url}/v1", api_key="unused", max_retries=0, timeout=120) as sdk:
        messages = [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is the capital of France?"},
        ]

        async def ask() -> tuple[str, str]:
            raw = await sdk.chat.completions.with_raw_response.create(
                model="SmolLM2-135M-Instruct.Q4_1", messages=messages, temperature=0, max_tokens=24, stream=True
            )
            text = ""
            async for chunk in raw.parse():
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
            return text, raw.headers["x-tokenmill-replica"]

        answers = await asyncio.gather(*(ask() for _ in range(8)))
    assert all("Paris" in text for text, _ in answers)
    assert len({replica for _, replica in answers}) == 2  # both replicas served requests


def test_deployment_options_follow_tokenmill_capacity():
    settings = Settings(mode="batch", max_batch=16, max_queue=40, drain_timeout=45)
    fixed = deployment_options(settings, RayOptions(num_replicas=3))
    assert fixed["max_ongoing_requests"] == 16 and fixed["num_replicas"] == 3
    assert fixed["max_queued_requests"] == 120 and fixed["graceful_shutdown_timeout_s"] == 45
    scaled = deployment_options(settings, RayOptions(autoscale_min=1, autoscale_max=4))
    assert "num_replicas" not in scaled and scaled["autoscaling_config"]["max_replicas"] == 4
    assert scaled["autoscaling_config"]["target_ongoing_requests"] == 12


FAST_SIM = {"engine": "simulated", "threads": 1, "sim_ttft_ms": 5, "sim_itl_ms": 20}


def _redeploy(settings: Settings) -> None:
    """Replace the module's application with one replica (these tests run after the two-replica one)."""
    serve.delete("tokenmill")
    serve.run(build_application(settings, RayOptions()), name="tokenmill", route_prefix="/")


def _chat(max_tokens: int) -> dict:
    return {
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
    }


async def _stream(http: httpx.AsyncClient, max_tokens: int) -> tuple[int, list[str], str]:
    """Status, the SSE data lines, and the replica that answered."""
    async with http.stream("POST", "/v1/chat/completions", json=_chat(max_tokens)) as response:
        lines = [line[6:] async for line in response.aiter_lines() if line.startswith("data: ")]
        return response.status_code, lines, response.headers.get("x-tokenmill-replica", "")


async def test_requests_past_capacity_plus_queue_are_refused_with_503_at_once(ray_url):
    # one replica, capacity 1, queue 1: Ray holds at most 1 queued request; the rest get 503 now
    _redeploy(Settings(mode="async", max_queue=1, **FAST_SIM))
    async with httpx.AsyncClient(base_url=ray_url, timeout=60) as http:
        started = time.monotonic()
        outcomes = await asyncio.gather(*(_stream(http, 40) for _ in range(6)))
        elapsed = time.monotonic() - started
    statuses = sorted(status for status, _, _ in outcomes)
    assert statuses.count(200) >= 1 and statuses.count(503) >= 3, statuses
    assert set(statuses) <= {200, 503}, statuses
    for status, lines, _ in outcomes:
        if status == 200:
            assert lines[-1] == "[DONE]" and '"finish_reason":"length"' in lines[-2]
    # served: at most the one running and the one queued, each 40 tokens x 20 ms, one after the other
    assert elapsed < 2 * 40 * 0.02 + 5


async def test_a_deleted_deployment_drains_its_running_stream_to_the_end(ray_url):
    _redeploy(Settings(mode="batch", drain_timeout=30, **FAST_SIM))
    async with httpx.AsyncClient(base_url=ray_url, timeout=60) as http:
        stream = asyncio.ensure_future(_stream(http, 100))  # 100 x 20 ms: running when the drain starts
        await asyncio.sleep(0.8)
        assert not stream.done()
        deleted = threading.Thread(target=serve.delete, args=("tokenmill",))
        deleted.start()  # Ray stops routing to the replica and waits for its ongoing requests
        status, lines, _ = await stream
        await asyncio.to_thread(deleted.join, 60)
    assert status == 200
    assert lines[-1] == "[DONE]" and '"finish_reason":"length"' in lines[-2], lines[-3:]
    assert sum('"content"' in line for line in lines) >= 100


async def test_ray_replaces_a_replica_whose_engine_gave_up(ray_url):
    # the engine crashes (SIGSEGV) at its 20th step and no restart is allowed: the replica stays up
    # but cannot serve, so its health check fails and Ray starts a new replica in its place
    crashing = Settings(mode="batch", engine_restart_limit=0, sim_fault="crash", sim_fault_at_step=20, **FAST_SIM)
    _redeploy(crashing)
    async with httpx.AsyncClient(base_url=ray_url, timeout=60) as http:
        status, lines, crashed_replica = await _stream(http, 40)
        assert status == 200 and '"error"' in lines[-2] and lines[-1] == "[DONE]", lines[-3:]
        deadline = time.monotonic() + 90
        replica = crashed_replica
        while replica == crashed_replica and time.monotonic() < deadline:
            await asyncio.sleep(1)
            models = await http.get("/v1/models")
            replica = models.headers.get("x-tokenmill-replica", crashed_replica)
        assert replica != crashed_replica, "Ray did not replace the replica"
        status, lines, _ = await _stream(http, 5)  # before the new engine's 20th step
        assert status == 200 and '"finish_reason":"length"' in lines[-2]
