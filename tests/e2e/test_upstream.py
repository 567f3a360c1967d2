"""Upstream mode: tokenmill in front of a second tokenmill (simulated engine) as the remote API."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time

import httpx
import pytest
from pydantic import ValidationError

from tests.conftest import asgi_client
from tokenmill.config import Settings

CHAT = [{"role": "user", "content": "tell me about queues"}]


def front(upstream_url: str, **overrides) -> Settings:
    return Settings(engine="upstream", mode="async", upstream_url=upstream_url, **overrides)


def events(text: str) -> list[dict]:
    return [json.loads(line[6:]) for line in text.split("\n") if line.startswith("data: {")]


async def test_streams_and_replies_pass_through_token_by_token(serve_process):
    upstream = serve_process("--engine", "simulated", "--mode", "batch", "--sim-itl-ms", "5")
    body = {"messages": CHAT, "max_tokens": 24, "seed": 3, "ignore_eos": True}
    async with httpx.AsyncClient(base_url=upstream.url) as direct:
        expected = (await direct.post("/v1/chat/completions", json=body)).json()["choices"][0]["message"]["content"]
    async with asgi_client(front(upstream.url)) as client:
        assert (await client.get("/v1/models")).json()["data"][0]["id"] == "simulated"  # learnt from upstream
        reply = (await client.post("/v1/chat/completions", json=body)).json()
        assert reply["choices"][0]["message"]["content"] == expected
        assert reply["usage"]["completion_tokens"] == 24  # the upstream's own usage
        streamed = await client.post("/v1/chat/completions", json={**body, "stream": True})
        chunks = [e["choices"][0]["delta"].get("content", "") for e in events(streamed.text) if e.get("choices")]
        assert "".join(chunks) == expected and len([c for c in chunks if c]) >= 20  # token by token, not one lump
        completion = await client.post("/v1/completions", json={"prompt": "Once", "max_tokens": 5})
        assert completion.status_code == 200 and completion.json()["choices"][0]["text"]


async def test_upstream_503s_are_retried_with_backoff_and_succeed(serve_process):
    # The upstream takes one request at a time and queues none: the second gets 503 + Retry-After.
    upstream = serve_process(
        "--engine", "simulated", "--mode", "async", "--max-concurrency", "1", "--max-queue", "0", "--sim-itl-ms", "20"
    )
    body = {"messages": CHAT, "max_tokens": 20, "ignore_eos": True}
    async with asgi_client(front(upstream.url)) as client:
        replies = await asyncio.gather(*(client.post("/v1/chat/completions", json=body) for _ in range(2)))
        assert [r.status_code for r in replies] == [200, 200]
    async with httpx.AsyncClient(base_url=upstream.url) as direct:
        metrics = (await direct.get("/metrics")).text
    refused = re.search(r'tokenmill_rejections_total\{reason="overloaded"\} (\d+)', metrics)
    assert refused and int(refused.group(1)) >= 1  # a refusal really happened, and was retried


async def test_a_stalled_upstream_hits_the_between_token_timeout(serve_process):
    upstream = serve_process("--engine", "simulated", "--mode", "batch", "--sim-ttft-ms", "5", "--sim-itl-ms", "3000")
    async with asgi_client(front(upstream.url, inter_token_timeout=0.5)) as client:
        started = time.monotonic()
        streamed = await client.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 5, "stream": True})
        assert events(streamed.text)[-1]["error"]["code"] == "inter_token_timeout"
        assert time.monotonic() - started < 2.5  # not the 3 s the upstream would take per token


async def test_a_small_pool_queues_requests_instead_of_failing_them(serve_process):
    upstream = serve_process("--engine", "simulated", "--mode", "batch", "--sim-ttft-ms", "5", "--sim-itl-ms", "30")
    settings = front(upstream.url, upstream_pool=2, max_concurrency=6)
    async with asgi_client(settings) as client:
        pool = client._transport.app.state.serving.runner.client._http._transport._pool
        assert pool._max_connections == 2
        body = {"messages": CHAT, "max_tokens": 20, "ignore_eos": True}
        started = time.monotonic()
        replies = await asyncio.gather(*(client.post("/v1/chat/completions", json=body) for _ in range(6)))
        elapsed = time.monotonic() - started
    assert all(r.status_code == 200 for r in replies)
    # six 0.6 s requests through two connections take three waves; all six at once would take one
    assert elapsed >= 1.5


async def test_an_unreachable_upstream_is_a_clear_502():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    settings = front(f"http://127.0.0.1:{closed_port}", upstream_model="m", upstream_attempts=2)
    async with asgi_client(settings) as client:
        reply = await client.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 5})
        assert reply.status_code == 502
        assert reply.json()["error"]["code"] == "upstream_unreachable"
        streamed = await client.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 5, "stream": True})
        assert events(streamed.text)[-1]["error"]["code"] == "upstream_unreachable"


async def test_echo_is_done_here_and_prompt_scoring_is_refused_by_name():
    """The upstream is never reached: echo's text is this server's to add, and the prompt's
    logprobs are a local engine's (an upstream reports none through this server)."""
    async with asgi_client(front("http://127.0.0.1:1", upstream_model="m")) as client:
        for body in (
            {"prompt": "hi", "echo": True, "logprobs": 1, "max_tokens": 0},
            {"prompt": "hi", "prompt_logprobs": 2, "max_tokens": 3},
        ):
            refused = await client.post("/v1/completions", json=body)
            assert refused.status_code == 400, refused.text
            assert refused.json()["error"]["param"] == "prompt_logprobs"


def test_upstream_refuses_other_modes_at_start_up():
    with pytest.raises(ValidationError, match="async only"):
        Settings(engine="upstream", mode="batch", upstream_url="http://127.0.0.1:1")
    with pytest.raises(ValidationError, match="needs --upstream-url"):
        Settings(engine="upstream")


async def test_max_tokens_limit_caps_requests_that_give_no_max_tokens_upstream_too(serve_process):
    # Before: the limit refused a larger max_tokens but let a request without one run to the
    # upstream's own default; the replies of this upstream run to about 300 tokens.
    upstream = serve_process(
        "--engine", "simulated", "--mode", "batch", "--sim-itl-ms", "0", "--sim-reply-tokens", "300"
    )
    async with asgi_client(front(upstream.url, max_tokens_limit=7)) as client:
        reply = (await client.post("/v1/chat/completions", json={"messages": CHAT})).json()
        refused = await client.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 8})
    assert reply["usage"]["completion_tokens"] == 7
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "max_tokens"


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 30}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
PERSON = {
    "type": "json_schema",
    "json_schema": {
        "name": "person",
        "schema": {
            "type": "object",
            "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"}},
            "required": ["name", "age"],
            "additionalProperties": False,
        },
    },
}


@pytest.mark.slow
async def test_tools_response_format_and_logprobs_pass_through_and_come_back(serve_process):
    """A second tokenmill with the default model as the upstream: what the client sent reaches it
    unchanged, and its tool calls, logprobs and structured answers come back unchanged."""
    upstream = serve_process("--mode", "batch", "--context-window", "2048")
    asked = [
        {"messages": CHAT, "tools": [WEATHER], "tool_choice": "required", "max_tokens": 60},
        {"messages": CHAT, "response_format": PERSON, "max_tokens": 60},
        {"messages": CHAT, "logprobs": True, "top_logprobs": 3, "max_tokens": 8},
    ]
    seen = []
    async with (
        httpx.AsyncClient(base_url=upstream.url, timeout=60) as direct,
        asgi_client(front(upstream.url)) as relay,
    ):
        for body in asked:
            body = {**body, "temperature": 0}
            await direct.post("/v1/chat/completions", json=body)  # warm its prefix cache: the next two reuse it alike
            expected = (await direct.post("/v1/chat/completions", json=body)).json()["choices"][0]
            relayed = await relay.post("/v1/chat/completions", json=body)
            assert relayed.status_code == 200, relayed.text
            got = relayed.json()["choices"][0]
            assert got["finish_reason"] == expected["finish_reason"]
            assert got["message"]["content"] == expected["message"]["content"]
            calls = [(c["function"]["name"], c["function"]["arguments"]) for c in got["message"]["tool_calls"] or ()]
            assert calls == [
                (c["function"]["name"], c["function"]["arguments"]) for c in expected["message"]["tool_calls"] or ()
            ]
            assert got["logprobs"] == expected["logprobs"]
            streamed = await relay.post("/v1/chat/completions", json={**body, "stream": True})
            chunks = [e["choices"][0] for e in events(streamed.text) if e.get("choices")]
            parts = [part for c in chunks for part in c["delta"].get("tool_calls") or ()]
            assert [(p["function"]["name"], p["function"]["arguments"]) for p in parts] == calls
            assert chunks[-1]["finish_reason"] == expected["finish_reason"]
            seen.append((calls, got))
    (calls, called), (_, structured), (_, with_logprobs) = seen
    assert called["finish_reason"] == "tool_calls" and calls[0][0] == "get_weather" and json.loads(calls[0][1])["city"]
    assert set(json.loads(structured["message"]["content"])) == {"name", "age"}
    assert len(with_logprobs["logprobs"]["content"][0]["top_logprobs"]) == 3
