"""Backpressure, timeouts, auth, limits, request ids, readiness and metrics, over ASGI."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import httpx
import pytest

from tests.conftest import asgi_client, sim_settings

USER = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("mode", ["async", "batch"])
async def test_flood_admits_capacity_plus_queue_and_refuses_the_rest(mode):
    settings = sim_settings(mode=mode, sim_itl_ms=20, max_concurrency=2, max_queue=2, replicas=2, max_batch=2)
    async with asgi_client(settings) as client:
        body = {"messages": USER, "max_tokens": 10, "ignore_eos": True}
        responses = await asyncio.gather(*(client.post("/v1/chat/completions", json=body) for _ in range(50)))
        ok = [r for r in responses if r.status_code == 200]
        refused = [r for r in responses if r.status_code == 503]
        assert len(ok) == 4 and len(refused) == 46
        assert all(r.json()["usage"]["completion_tokens"] == 10 for r in ok)
        assert all(int(r.headers["retry-after"]) >= 1 for r in refused)
        assert all(r.json()["error"]["type"] == "server_overloaded" for r in refused)
        after = await client.post("/v1/chat/completions", json=body)
        assert after.status_code == 200  # still serving
        metrics = (await client.get("/metrics")).text
        assert 'tokenmill_rejections_total{reason="overloaded"} 46.0' in metrics


async def test_the_first_token_deadline_counts_from_arrival_so_queueing_counts():
    # One place; the first request holds it for about a second. The second waits in the queue past
    # its 0.5 s first-token deadline: admitted, it is timed out at once. Before, the deadline started
    # when the stream began, so it got a full 0.5 s more (and its first token, 1 ms later).
    settings = sim_settings(sim_ttft_ms=1, sim_itl_ms=50, max_concurrency=1, max_queue=4, first_token_timeout=0.5)
    async with asgi_client(settings) as client:
        body = {"messages": USER, "max_tokens": 20, "ignore_eos": True}
        holder = asyncio.ensure_future(client.post("/v1/chat/completions", json=body))
        await asyncio.sleep(0.05)
        started = time.perf_counter()
        late = await client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 2})
        waited = time.perf_counter() - started
        assert (await holder).status_code == 200
    assert late.status_code == 504 and late.json()["error"]["code"] == "first_token_timeout"
    assert "arrival" in late.json()["error"]["message"] and waited < 1.4  # at admission, not 0.5 s later


async def test_first_token_timeout_gives_504_or_an_error_event():
    async with asgi_client(sim_settings(sim_ttft_ms=1500, first_token_timeout=0.1)) as client:
        started = time.perf_counter()
        response = await client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 5})
        assert response.status_code == 504
        assert response.json()["error"]["code"] == "first_token_timeout"
        assert time.perf_counter() - started < 1.0  # cut at the timeout, not after the 1.5 s prefill
        streamed = await client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 5, "stream": True})
        lines = [line for line in streamed.text.split("\n") if line.startswith("data: ")]
        assert json.loads(lines[-2][6:])["error"]["code"] == "first_token_timeout"
        assert lines[-1] == "data: [DONE]"


async def test_inter_token_timeout_stops_a_stalled_stream():
    async with asgi_client(sim_settings(sim_ttft_ms=1, sim_itl_ms=300, inter_token_timeout=0.1)) as client:
        streamed = await client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 5, "stream": True})
        payloads = [line[6:] for line in streamed.text.split("\n") if line.startswith("data: ")]
        contents = [json.loads(p) for p in payloads[:-1]]
        assert any(c.get("choices") and c["choices"][0]["delta"].get("content") for c in contents)  # got a token
        assert contents[-1]["error"]["code"] == "inter_token_timeout"
        assert payloads[-1] == "[DONE]"


async def test_total_timeout_and_per_request_timeout_only_shorten():
    async with asgi_client(sim_settings(sim_itl_ms=50, request_timeout=0.3)) as client:
        long = await client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 50, "ignore_eos": True})
        assert long.status_code == 504 and long.json()["error"]["code"] == "request_timeout"
        shorter = await client.post(
            "/v1/completions", json={"prompt": "x", "max_tokens": 50, "ignore_eos": True, "timeout": 0.1}
        )
        assert shorter.status_code == 504
        longer = await client.post(
            "/v1/completions", json={"prompt": "x", "max_tokens": 50, "ignore_eos": True, "timeout": 100}
        )
        assert longer.status_code == 504  # the request cannot extend the server's 0.3 s
        assert 'tokenmill_aborts_total{reason="deadline"} 3.0' in (await client.get("/metrics")).text


async def test_api_key_guards_inference_but_not_health():
    async with asgi_client(sim_settings(api_key="s3cret,other")) as client:
        body = {"messages": USER, "max_tokens": 2}
        missing = await client.post("/v1/chat/completions", json=body)
        assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
        assert missing.headers["www-authenticate"] == "Bearer"
        wrong = await client.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        right = await client.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer other"})
        assert right.status_code == 200
        assert (await client.get("/health")).status_code == 200
        assert (await client.get("/ready")).status_code == 200
        assert (await client.get("/metrics")).status_code == 200
    async with asgi_client(sim_settings(api_key="s3cret", metrics_require_key=True)) as client:
        assert (await client.get("/metrics")).status_code == 401


async def test_limits_on_body_prompt_and_max_tokens():
    settings = sim_settings(max_body_bytes=2048, max_prompt_tokens=20, max_tokens_limit=8)
    async with asgi_client(settings) as client:
        huge = await client.post("/v1/completions", json={"prompt": "x" * 5000})
        assert huge.status_code == 413 and huge.json()["error"]["code"] == "request_too_large"
        long_prompt = await client.post("/v1/completions", json={"prompt": "word " * 50})
        assert long_prompt.status_code == 400 and "at most 20" in long_prompt.json()["error"]["message"]
        greedy = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 9})
        assert greedy.status_code == 400 and greedy.json()["error"]["param"] == "max_tokens"
        capped = await client.post("/v1/completions", json={"prompt": "hi", "ignore_eos": True})
        assert capped.json()["usage"]["completion_tokens"] == 8  # the limit also caps the default


async def test_request_id_is_echoed_or_generated(client: httpx.AsyncClient):
    given = await client.get("/health", headers={"X-Request-ID": "abc-123"})
    assert given.headers["x-request-id"] == "abc-123"
    generated = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    assert len(generated.headers["x-request-id"]) == 32
    refused = await client.post("/v1/completions", json={"prompt": 3})
    assert refused.status_code == 400 and refused.headers["x-request-id"]


async def test_metrics_expose_the_documented_series(client: httpx.AsyncClient):
    await client.post(
        "/v1/chat/completions", json={"messages": USER, "max_tokens": 4, "ignore_eos": True, "stream": True}
    )
    text = (await client.get("/metrics")).text
    for series in (
        'tokenmill_requests_total{route="/v1/chat/completions",status="200"}',
        "tokenmill_in_flight_requests",
        "tokenmill_queue_depth",
        "tokenmill_batch_running_sequences",
        "tokenmill_kv_cache_used_tokens",
        "tokenmill_time_to_first_token_seconds_bucket",
        "tokenmill_inter_token_latency_seconds_bucket",
        "tokenmill_request_duration_seconds_count",
        "tokenmill_generation_tokens_total 4.0",
        "tokenmill_event_loop_lag_seconds",
    ):
        assert series in text, series


async def test_non_streamed_client_disconnect_frees_the_place():
    settings = sim_settings(sim_itl_ms=20, max_concurrency=1, max_queue=0)
    async with asgi_client(settings) as client:
        slow = asyncio.ensure_future(client.post("/generate", json={"prompt": "x", "max_tokens": 200}))
        await asyncio.sleep(0.2)
        slow.cancel()  # the client goes away mid-generation
        await asyncio.sleep(0.1)
        started = time.perf_counter()
        quick = await client.post("/generate", json={"prompt": "y", "max_tokens": 2})
        assert quick.status_code == 200 and time.perf_counter() - started < 1
        assert 'tokenmill_aborts_total{reason="client_disconnect"} 1.0' in (await client.get("/metrics")).text


async def test_a_blocked_event_loop_is_reported(caplog):
    async with asgi_client(sim_settings()) as client:
        caplog.set_level(logging.WARNING, logger="tokenmill.server.metrics")
        await asyncio.sleep(0.1)
        time.sleep(0.3)  # a blocking call on the loop, on purpose
        await asyncio.sleep(0.1)
        assert any("event loop blocked" in r.message for r in caplog.records)
        lag = [
            line
            for line in (await client.get("/metrics")).text.splitlines()
            if line.startswith("tokenmill_event_loop_lag_max_seconds ")
        ]
        assert float(lag[0].split()[1]) >= 0.25


async def test_queue_timeout_answers_503_before_any_work():
    settings = sim_settings(sim_itl_ms=50, max_concurrency=1, max_queue=5, queue_timeout=0.1)
    async with asgi_client(settings) as client:
        body = {"prompt": "x", "max_tokens": 20, "ignore_eos": True}
        first, second = await asyncio.gather(
            client.post("/v1/completions", json=body), client.post("/v1/completions", json=body)
        )
        statuses = sorted([first.status_code, second.status_code])
        assert statuses == [200, 503]
        late = first if first.status_code == 503 else second
        assert late.json()["error"]["code"] == "queue_timeout" and late.headers["retry-after"]


async def test_cors_is_off_by_default_and_configurable():
    async with asgi_client(sim_settings()) as client:
        response = await client.options(
            "/v1/models", headers={"Origin": "https://app.example", "Access-Control-Request-Method": "GET"}
        )
        assert "access-control-allow-origin" not in response.headers
    async with asgi_client(sim_settings(cors_origins="https://app.example", api_key="k")) as client:
        preflight = await client.options(
            "/v1/chat/completions",
            headers={
                "Origin": "https://app.example",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization",
            },
        )
        assert preflight.status_code == 200  # preflight needs no API key
        assert preflight.headers["access-control-allow-origin"] == "https://app.example"


async def test_api_key_file_and_json_access_logs(tmp_path, caplog):
    keys = tmp_path / "keys"
    keys.write_text("first\n\nsecond\n")
    caplog.set_level(logging.INFO, logger="tokenmill.access")
    async with asgi_client(sim_settings(api_key_file=str(keys), log_format="json")) as client:
        ok = await client.post(
            "/v1/completions",
            json={"prompt": "secret prompt", "max_tokens": 2},
            headers={"Authorization": "Bearer second", "X-Request-ID": "req-7"},
        )
        assert ok.status_code == 200
    entries = [json.loads(r.message) for r in caplog.records if r.name == "tokenmill.access"]
    entry = next(e for e in entries if e["request_id"] == "req-7")
    assert entry["path"] == "/v1/completions" and entry["status"] == 200 and entry["duration_ms"] >= 0
    assert all("secret prompt" not in r.getMessage() for r in caplog.records)  # prompts are never logged


async def test_a_client_gone_before_the_stream_starts_still_frees_its_place():
    """The response's first send fails (client already gone): the body is never iterated, yet the
    place is freed and the generation stopped."""
    from tokenmill.server import create_app

    app = create_app(sim_settings(sim_itl_ms=20, max_concurrency=1, max_queue=0))
    serving = app.state.serving
    async with app.router.lifespan_context(app):
        body = json.dumps({"messages": USER, "max_tokens": 500, "stream": True}).encode()
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/v1/chat/completions",
            "raw_path": b"/v1/chat/completions",
            "query_string": b"",
            "root_path": "",
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            "client": ("127.0.0.1", 1),
            "server": ("127.0.0.1", 80),
        }
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive():
            return messages.pop(0) if messages else await asyncio.Future()  # then: nothing more, ever

        async def send(message):
            raise OSError("connection reset by peer")

        with pytest.raises(OSError):
            await app(scope, receive, send)
        await asyncio.sleep(0.1)
        assert serving.admission.active == 0
        assert serving.runner.in_flight == 0  # the generation was aborted, not left running


def test_idle_connections_outlive_the_pools_of_common_clients():
    """If the server closed idle connections first, a request sent on one as it closes would fail
    unanswered (under load the close can land after the request is already on the wire)."""
    import httpx
    import openai._constants

    from tokenmill.config import Settings

    server_idle = Settings().keep_alive_timeout
    assert server_idle > (httpx.Limits().keepalive_expiry or 0)
    assert server_idle > (openai._constants.DEFAULT_CONNECTION_LIMITS.keepalive_expiry or 0)


@pytest.mark.parametrize("path", ["/health", "/ready", "/metrics"])
async def test_operational_routes_answer_head_probes(path):
    async with asgi_client(sim_settings()) as client:
        response = await client.head(path)
    assert response.status_code == 200 and response.content == b""
