"""The client frameworks people build on, unchanged, against a real `tokenmill serve` with the
default model in batch mode: litellm (the `openai/` provider), instructor (tools and JSON-schema
modes), langchain-openai (`bind_tools`, `with_structured_output`) and pydantic-ai (an agent with a
tool and a structured output). What each asserts is what the framework's user relies on."""

from __future__ import annotations

import asyncio
import os

import pytest
from openai import AsyncOpenAI
from pydantic import BaseModel, Field

from tokenmill.bench.spawn import SpawnedServer

pytestmark = pytest.mark.slow  # a model load; runs in CI too

# litellm fetches a price list from the internet at import unless told to use its own copy
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")


@pytest.fixture(scope="module")
def server():
    with SpawnedServer(["--max-batch", "8", "--context-window", "2048"]) as server:
        yield server


@pytest.fixture(scope="module")
def model(server) -> str:
    import httpx

    return httpx.get(f"{server.url}/v1/models").json()["data"][0]["id"]


class River(BaseModel):
    name: str = Field(max_length=30)
    length_km: int = Field(ge=0, le=10_000)


def get_weather(city: str) -> str:
    """The current weather in a city."""
    return f"18 degrees and clear in {city}"


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 40}},
            "required": ["city"],
        },
    },
}
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]
ASK_RIVER = [{"role": "user", "content": "Name a long river."}]


async def test_litellm_plain_streamed_and_a_tool_round_trip(server, model):
    litellm = pytest.importorskip("litellm")
    litellm.telemetry = False
    where = {"model": f"openai/{model}", "api_base": f"{server.url}/v1", "api_key": "unused"}
    plain = await litellm.acompletion(**where, messages=[{"role": "user", "content": "Hi"}], max_tokens=10)
    assert plain.choices[0].message.content and plain.usage.completion_tokens > 0
    stream = await litellm.acompletion(
        **where, messages=[{"role": "user", "content": "Hi"}], max_tokens=10, stream=True
    )
    assert "".join([chunk.choices[0].delta.content or "" async for chunk in stream])
    called = await litellm.acompletion(
        **where, messages=ASK_WEATHER, tools=[WEATHER_TOOL], tool_choice="required", max_tokens=60
    )
    message = called.choices[0].message
    (call,) = message.tool_calls
    assert call.function.name == "get_weather"
    # litellm's message sent back as it is: with its provider_specific_fields (refused before issue 35)
    sent_back = message.model_dump()
    assert "provider_specific_fields" in sent_back
    answered = await litellm.acompletion(
        **where,
        messages=[*ASK_WEATHER, sent_back, {"role": "tool", "tool_call_id": call.id, "content": "sunny"}],
        tools=[WEATHER_TOOL],
        max_tokens=20,
    )
    assert answered.choices[0].message.content


@pytest.mark.parametrize("mode", ["TOOLS", "JSON_SCHEMA"])
async def test_instructor_gives_a_valid_object_every_time(server, model, mode):
    instructor = pytest.importorskip("instructor")
    client = instructor.from_openai(
        AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0), mode=getattr(instructor.Mode, mode)
    )
    rivers = await asyncio.gather(
        *(
            client.chat.completions.create(
                model=model,
                response_model=River,
                messages=ASK_RIVER,
                max_tokens=200,
                max_retries=0,
                temperature=0.7,
                seed=seed,
            )
            for seed in range(8)
        )
    )
    assert all(isinstance(river, River) for river in rivers)


async def test_langchain_openai_bind_tools_and_structured_output(server, model):
    langchain_openai = pytest.importorskip("langchain_openai")
    llm = langchain_openai.ChatOpenAI(
        model=model, base_url=f"{server.url}/v1", api_key="unused", max_tokens=120, temperature=0, max_retries=0
    )
    assert (await llm.ainvoke("Hi")).content
    reply = await llm.bind_tools([get_weather], tool_choice="any").ainvoke("What is the weather in Paris?")
    (call,) = reply.tool_calls
    assert call["name"] == "get_weather" and call["args"]["city"]
    for method in ("json_schema", "function_calling"):
        river = await llm.with_structured_output(River, method=method).ainvoke("Name a long river.")
        assert isinstance(river, River), method


async def test_pydantic_ai_agent_with_a_tool_and_a_structured_output(server, model):
    pydantic_ai = pytest.importorskip("pydantic_ai")
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    chat = OpenAIChatModel(model, provider=OpenAIProvider(base_url=f"{server.url}/v1", api_key="unused"))
    # NativeOutput: the output through response_format, which constrained decoding holds to River's schema
    rivers = pydantic_ai.Agent(
        chat, output_type=pydantic_ai.NativeOutput(River), tools=[get_weather], instructions="Answer about rivers."
    )
    result = await rivers.run("Name a long river.", model_settings={"max_tokens": 150, "temperature": 0})
    assert isinstance(result.output, River)
    # the agent's own function as a tool, its answer fed back; the tiny model may ask for it more than
    # once, so the run is bounded in requests as an agent in production would be
    called: list[str] = []

    def weather_in(city: str) -> str:
        """The current weather in a city."""
        called.append(city)
        return get_weather(city)

    weather = pydantic_ai.Agent(chat, tools=[weather_in], instructions="Use the tool to answer.")
    try:
        answer = await weather.run(
            "What is the weather in Paris?",
            model_settings={"max_tokens": 80, "temperature": 0},
            usage_limits=pydantic_ai.UsageLimits(request_limit=4),
        )
        assert answer.output
    except pydantic_ai.exceptions.UsageLimitExceeded:
        assert called, "the limit was reached without the tool ever being called"
    assert all(city for city in called)
