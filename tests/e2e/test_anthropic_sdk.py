"""Anthropic's Messages API driven by the official `anthropic` SDK, on a real `tokenmill serve` with
the default model in batch mode: plain and streamed messages (the stream assembles to the very
message the plain call gives), a tool use round trip, count_tokens, x-api-key auth, errors."""

from __future__ import annotations

import asyncio
import json

import anthropic
import pytest
from anthropic import AsyncAnthropic

from tokenmill.bench.spawn import SpawnedServer

pytestmark = pytest.mark.slow  # a model load; runs in CI too

KEY = "sk-test-anthropic"


@pytest.fixture(scope="module")
def server():
    # No prefix cache: a greedy answer then depends on nothing but the request (with it, a prompt
    # computed in a prefill step and one served from cache can part at a near tie of this tiny model),
    # so a stream can be compared with the plain message token for token.
    args = ["--max-batch", "8", "--context-window", "2048", "--api-key", KEY, "--no-prefix-cache"]
    with SpawnedServer(args) as server:
        yield server


@pytest.fixture
async def claude(server):
    async with AsyncAnthropic(base_url=server.url, api_key=KEY, max_retries=0, timeout=120) as client:
        yield client


async def _model(server) -> str:
    import httpx

    async with httpx.AsyncClient() as http:
        listed = await http.get(f"{server.url}/v1/models", headers={"x-api-key": KEY})
    return listed.json()["data"][0]["id"]


# the 2.x SDK no longer takes temperature as an argument; the API (and tokenmill) still does
GREEDY = {"temperature": 0}
ASK = [{"role": "user", "content": "Name three rivers in Europe."}]
SYSTEM = "You are a helpful assistant."

WEATHER = {
    "name": "get_weather",
    "description": "The current weather in a city.",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 40}, "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"],
        "additionalProperties": False,
    },
}
ASK_WEATHER = [{"role": "user", "content": "What is the weather like in Paris today?"}]


async def test_a_message_and_its_stream_are_the_same_message(claude, server):
    model = await _model(server)
    asked = {"model": model, "system": SYSTEM, "messages": ASK, "max_tokens": 40, "extra_body": GREEDY}
    whole = await claude.messages.create(**asked)
    assert whole.type == "message" and whole.role == "assistant" and whole.model == model
    assert whole.stop_reason in ("end_turn", "max_tokens") and whole.content[0].text
    counted = await claude.messages.count_tokens(model=model, system=SYSTEM, messages=ASK)
    assert whole.usage.input_tokens == counted.input_tokens > 10

    events = []
    async with claude.messages.stream(**asked) as stream:
        async for event in stream:
            events.append(event.type)
        streamed = await stream.get_final_message()
    assert events[0] == "message_start" and events[-1] == "message_stop"
    assert "content_block_start" in events and "content_block_stop" in events and "message_delta" in events
    assert [b.model_dump() for b in streamed.content] == [b.model_dump() for b in whole.content]
    assert (streamed.stop_reason, streamed.usage.output_tokens) == (whole.stop_reason, whole.usage.output_tokens)


async def test_a_tool_use_round_trip(claude, server):
    """tool_choice any: a tool_use block whose input fits the schema; the result back as a
    tool_result block, then a text answer. Ten round trips, sampled."""
    model = await _model(server)
    limit = asyncio.Semaphore(4)

    async def one(index: int) -> str:
        async with limit:
            called = await claude.messages.create(
                model=model,
                messages=ASK_WEATHER,
                tools=[WEATHER],
                tool_choice={"type": "any"},
                max_tokens=80,
                extra_body={"temperature": 0.7},
            )
            assert called.stop_reason == "tool_use", called
            (use,) = [block for block in called.content if block.type == "tool_use"]
            assert use.name == "get_weather" and use.input["unit"] in ("celsius", "fahrenheit"), use
            result = {"type": "tool_result", "tool_use_id": use.id, "content": "18 degrees, clear sky"}
            answered = await claude.messages.create(
                model=model,
                messages=[
                    *ASK_WEATHER,
                    {"role": "assistant", "content": [block.model_dump() for block in called.content]},
                    {"role": "user", "content": [result]},
                ],
                tools=[WEATHER],
                tool_choice={"type": "none"},
                max_tokens=16,
                extra_body={"temperature": 0.7},
            )
        assert all(block.type == "text" for block in answered.content)
        return answered.content[0].text

    answers = await asyncio.gather(*(one(i) for i in range(10)))
    assert all(answers)


async def test_a_streamed_tool_use_assembles_to_the_plain_one(claude, server):
    model = await _model(server)
    asked = {"model": model, "messages": ASK_WEATHER, "tools": [WEATHER], "max_tokens": 80, "extra_body": GREEDY}
    asked["tool_choice"] = {"type": "tool", "name": "get_weather"}
    whole = await claude.messages.create(**asked)
    async with claude.messages.stream(**asked) as stream:
        streamed = await stream.get_final_message()
    strip_ids = [{k: v for k, v in b.model_dump().items() if k != "id"} for b in whole.content]
    assert [{k: v for k, v in b.model_dump().items() if k != "id"} for b in streamed.content] == strip_ids
    assert whole.stop_reason == streamed.stop_reason == "tool_use"


async def test_structured_output_holds_to_the_schema(claude, server):
    model = await _model(server)
    schema = {
        "type": "object",
        "properties": {"river": {"type": "string", "maxLength": 30}, "length_km": {"type": "integer"}},
        "required": ["river", "length_km"],
        "additionalProperties": False,
    }
    reply = await claude.messages.create(
        model=model,
        messages=[{"role": "user", "content": "Name a long river."}],
        max_tokens=60,
        output_config={"format": {"type": "json_schema", "schema": schema}, "effort": "low"},
        extra_body=GREEDY,
    )
    answer = json.loads(reply.content[0].text)
    assert set(answer) == {"river", "length_km"} and isinstance(answer["length_km"], int), answer


async def test_count_tokens_counts_the_tools_declared(claude, server):
    model = await _model(server)
    plain = await claude.messages.count_tokens(model=model, messages=ASK_WEATHER)
    with_tools = await claude.messages.count_tokens(model=model, messages=ASK_WEATHER, tools=[WEATHER])
    assert with_tools.input_tokens > plain.input_tokens + 20


async def test_errors_come_in_anthropics_shape(claude, server):
    model = await _model(server)
    async with AsyncAnthropic(base_url=server.url, api_key="wrong", max_retries=0) as stranger:
        with pytest.raises(anthropic.AuthenticationError) as refused:
            await stranger.messages.create(model=model, messages=ASK, max_tokens=5)
    assert refused.value.body["error"]["type"] == "authentication_error"
    with pytest.raises(anthropic.NotFoundError) as missing:
        await claude.messages.create(model="claude-opus-4", messages=ASK, max_tokens=5)
    assert missing.value.body["type"] == "error" and missing.value.body["error"]["type"] == "not_found_error"
    assert "claude-opus-4" in missing.value.body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError) as bad:
        await claude.messages.create(
            model=model, messages=ASK, max_tokens=5, tools=[{"type": "web_search_20250305", "name": "web_search"}]
        )
    assert "only custom tools" in bad.value.body["error"]["message"]
