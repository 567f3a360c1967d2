"""A real `tokenmill serve` process on 127.0.0.1, driven by the official OpenAI SDK."""

from __future__ import annotations

import time

import httpx
import pytest
from openai import AsyncOpenAI, BadRequestError, NotFoundError

SIM_ARGS = ("--engine", "simulated", "--sim-ttft-ms", "5", "--sim-itl-ms", "10")


@pytest.fixture
def sim_server(serve_process):
    return serve_process(*SIM_ARGS)


@pytest.fixture
async def sdk(sim_server):
    async with AsyncOpenAI(base_url=f"{sim_server.url}/v1", api_key="unused", max_retries=0) as client:
        yield client


MESSAGES = [{"role": "user", "content": "Say something."}]


async def test_sdk_chat_non_streamed_and_streamed_agree(sdk: AsyncOpenAI):
    whole = await sdk.chat.completions.create(model="simulated", messages=MESSAGES, max_tokens=20, seed=11)
    stream = await sdk.chat.completions.create(
        model="simulated",
        messages=MESSAGES,
        max_tokens=20,
        seed=11,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, usage, finish = [], None, None
    async for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage
    assert "".join(pieces) == whole.choices[0].message.content
    assert finish == whole.choices[0].finish_reason
    assert usage is not None and usage.model_dump() == whole.usage.model_dump() | {
        k: v for k, v in usage.model_dump().items() if k not in whole.usage.model_dump()
    }
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


async def test_sdk_completions_non_streamed_and_streamed(sdk: AsyncOpenAI):
    whole = await sdk.completions.create(model="simulated", prompt="The answer is", max_tokens=12, temperature=0)
    stream = await sdk.completions.create(
        model="simulated",
        prompt="The answer is",
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, usage = "", None
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].text
        usage = chunk.usage or usage
    assert text == whole.choices[0].text
    assert usage.completion_tokens == whole.usage.completion_tokens


async def test_sdk_lists_models_and_surfaces_errors(sdk: AsyncOpenAI):
    models = await sdk.models.list()
    assert [m.id for m in models.data] == ["simulated"]
    with pytest.raises(BadRequestError) as bad:
        await sdk.chat.completions.create(model="simulated", messages=[], max_tokens=5)
    assert "messages" in str(bad.value)
    with pytest.raises(NotFoundError):
        await sdk.chat.completions.create(model="no-such-model", messages=MESSAGES)


async def test_stream_reaches_the_client_token_by_token(sim_server):
    """With 10 ms per token, the first token must arrive long before the 40-token stream ends."""
    body = {"messages": MESSAGES, "max_tokens": 40, "ignore_eos": True, "stream": True}
    arrivals = []
    async with httpx.AsyncClient(base_url=sim_server.url) as client:
        started = time.perf_counter()
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: ") and '"content"' in line:
                    arrivals.append(time.perf_counter() - started)
    # the role chunk, one chunk per token, and maybe one U+FFFD for a character max_tokens cut in half
    assert 41 <= len(arrivals) <= 42
    assert arrivals[1] < arrivals[-1] / 3


def test_simple_generate_and_stream_routes(sim_server):
    generated = httpx.post(f"{sim_server.url}/generate", json={"prompt": "hello", "max_tokens": 5}).json()
    assert set(generated) == {"text", "tokens"} and 1 <= generated["tokens"] <= 5
    with httpx.stream("GET", f"{sim_server.url}/stream", params={"prompt": "hello", "max_tokens": 5}) as response:
        events = [e for e in response.read().decode().split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    assert 1 <= len(events) - 1 <= 6  # a token each, plus at most a cut character's U+FFFD
