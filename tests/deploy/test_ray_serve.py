"""tokenmill on a local Ray cluster: two replicas of the default model behind Ray Serve's proxy."""

from __future__ import annotations

import asyncio
import socket

import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from openai import AsyncOpenAI

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
    ray.init(num_cpus=2, include_dashboard=False, address="local", log_to_driver=False, _node_ip_address="127.0.0.1")
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
