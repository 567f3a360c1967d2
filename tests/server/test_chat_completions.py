"""POST /v1/chat/completions over ASGI: bodies, streams, usage, seeds."""

from __future__ import annotations

import json

import httpx

CHAT = {"messages": [{"role": "user", "content": "Tell me about batching."}], "max_tokens": 16}


def sse_payloads(body: str) -> list[str]:
    """The data of each event, in order (one data line per event in these streams)."""
    return [line[len("data: ") :] for line in body.split("\n") if line.startswith("data: ")]


async def test_non_streamed_reply_has_openai_shape(client: httpx.AsyncClient):
    response = await client.post("/v1/chat/completions", json={**CHAT, "seed": 3})
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert body["model"] == "simulated"
    (choice,) = body["choices"]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"]
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert 0 < usage["completion_tokens"] <= 16


async def test_streamed_text_equals_non_streamed_text_for_same_seed(client: httpx.AsyncClient):
    request = {**CHAT, "seed": 42, "temperature": 0.8}
    whole = (await client.post("/v1/chat/completions", json=request)).json()
    streamed = await client.post("/v1/chat/completions", json={**request, "stream": True})
    chunks = [json.loads(p) for p in sse_payloads(streamed.text)[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == whole["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]


async def test_stream_framing_headers_and_done_last(client: httpx.AsyncClient):
    response = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache"
    assert response.headers["x-accel-buffering"] == "no"
    payloads = sse_payloads(response.text)
    assert payloads[-1] == "[DONE]"
    assert payloads.count("[DONE]") == 1
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all("usage" not in c for c in chunks)


async def test_stream_include_usage_ends_with_usage_chunk(client: httpx.AsyncClient):
    request = {**CHAT, "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
    response = await client.post("/v1/chat/completions", json=request)
    chunks = [json.loads(p) for p in sse_payloads(response.text)[:-1]]
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == 16
    assert usage_chunk["usage"]["total_tokens"] == usage_chunk["usage"]["prompt_tokens"] + 16
    assert all(c["usage"] is None for c in chunks[:-1])


async def test_greedy_is_deterministic_and_seeds_change_sampled_text(client: httpx.AsyncClient):
    async def text(**extra) -> str:
        body = (await client.post("/v1/chat/completions", json={**CHAT, **extra})).json()
        return body["choices"][0]["message"]["content"]

    assert await text(temperature=0) == await text(temperature=0)
    assert await text(seed=1) == await text(seed=1)
    assert await text(seed=1) != await text(seed=2)


async def test_max_completion_tokens_wins_over_max_tokens(client: httpx.AsyncClient):
    request = {**CHAT, "max_tokens": 30, "max_completion_tokens": 5, "ignore_eos": True}
    body = (await client.post("/v1/chat/completions", json=request)).json()
    assert body["usage"]["completion_tokens"] == 5
    assert body["choices"][0]["finish_reason"] == "length"


async def test_stop_string_ends_reply_without_emitting_it(client: httpx.AsyncClient):
    base = {**CHAT, "seed": 7, "max_tokens": 40, "ignore_eos": True}
    full = (await client.post("/v1/chat/completions", json=base)).json()["choices"][0]["message"]["content"]
    stop = full.split()[5]  # a word that occurs in the reply
    cut = (await client.post("/v1/chat/completions", json={**base, "stop": [stop]})).json()
    assert cut["choices"][0]["finish_reason"] == "stop"
    assert cut["choices"][0]["message"]["content"] == full[: full.index(stop)]


async def test_text_content_parts_are_accepted(client: httpx.AsyncClient):
    parts = [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]
    request = {"messages": [{"role": "user", "content": parts}], "max_tokens": 4}
    assert (await client.post("/v1/chat/completions", json=request)).status_code == 200


async def test_model_name_must_match_served_model(client: httpx.AsyncClient):
    ok = await client.post("/v1/chat/completions", json={**CHAT, "model": "simulated"})
    assert ok.status_code == 200
    wrong = await client.post("/v1/chat/completions", json={**CHAT, "model": "gpt-9"})
    assert wrong.status_code == 404
    assert wrong.json()["error"]["code"] == "model_not_found"
