"""The default model, served by a real `tokenmill serve` process, through the OpenAI SDK."""

from __future__ import annotations

import pytest
from openai import AsyncOpenAI


@pytest.fixture(scope="module")
def default_server():
    from tokenmill.bench.spawn import SpawnedServer

    server = SpawnedServer([], log_level="info")  # no serve flags: the default engine and model
    yield server
    server.stop()


async def test_default_model_knows_the_capital_of_france(default_server):
    async with AsyncOpenAI(base_url=f"{default_server.url}/v1", api_key="unused", max_retries=0) as sdk:
        (model,) = (await sdk.models.list()).data
        assert model.id == "SmolLM2-135M-Instruct.Q4_1"
        messages = [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is the capital of France?"},
        ]
        reply = await sdk.chat.completions.create(model=model.id, messages=messages, temperature=0, max_tokens=30)
        assert "Paris" in reply.choices[0].message.content
        stream = await sdk.chat.completions.create(
            model=model.id, messages=messages, temperature=0, max_tokens=30, stream=True,
            stream_options={"include_usage": True},
        )
        text, usage = "", None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
            usage = chunk.usage or usage
        assert text == reply.choices[0].message.content
        assert usage.completion_tokens == reply.usage.completion_tokens
