"""OpenAI's Responses API, driven by the official SDK's `responses.create` and by the openai-agents
SDK with its default (Responses) model, on a real `tokenmill serve` with the default model in
batch mode: plain and streamed (the stream's final response is the plain one), a function tool
round trip, structured output, refusals of what a stateless server cannot do."""

from __future__ import annotations

import asyncio
import json

import openai
import pytest
from openai import AsyncOpenAI

from tokenmill.bench.spawn import SpawnedServer

pytestmark = pytest.mark.slow  # a model load; runs in CI too


@pytest.fixture(scope="module")
def server():
    # No prefix cache: a greedy answer then depends on nothing but the request, so a stream can be
    # compared with the plain response token for token (see test_anthropic_sdk.py)
    with SpawnedServer(["--max-batch", "8", "--context-window", "2048", "--no-prefix-cache"]) as server:
        yield server


@pytest.fixture
async def sdk(server):
    async with AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120) as client:
        yield client


async def _model(sdk: AsyncOpenAI) -> str:
    return (await sdk.models.list()).data[0].id


WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The current weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 40}},
        "required": ["city"],
        "additionalProperties": False,
    },
    "strict": True,
}
ASK_WEATHER = "What is the weather like in Paris today?"


def _without_ids(response) -> list[dict]:
    return [{k: v for k, v in item.model_dump().items() if k not in ("id", "call_id")} for item in response.output]


async def test_a_response_and_its_stream_are_the_same_response(sdk):
    model = await _model(sdk)
    asked = {"model": model, "input": "Name three rivers in Europe.", "instructions": "Be brief."}
    asked |= {"max_output_tokens": 40, "temperature": 0}
    whole = await sdk.responses.create(**asked)
    assert whole.object == "response" and whole.model == model and whole.output_text
    assert whole.status in ("completed", "incomplete") and whole.usage.input_tokens > 10
    kinds, final = [], None
    async for event in await sdk.responses.create(**asked, stream=True):
        kinds.append(event.type)
        if event.type in ("response.completed", "response.incomplete"):
            final = event.response
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert "response.output_text.delta" in kinds and kinds[-1] in ("response.completed", "response.incomplete")
    assert final is not None and _without_ids(final) == _without_ids(whole)
    assert (final.status, final.usage.output_tokens) == (whole.status, whole.usage.output_tokens)
    assert final.output_text == whole.output_text


async def test_a_function_tool_round_trip(sdk):
    """tool_choice required: a function_call item whose arguments fit the schema; its output back as
    a function_call_output item (with the SDK's own items sent back as they are), then text."""
    model = await _model(sdk)
    limit = asyncio.Semaphore(4)

    async def one(index: int) -> str:
        async with limit:
            called = await sdk.responses.create(
                model=model, input=ASK_WEATHER, tools=[WEATHER], tool_choice="required", temperature=0.7,
                max_output_tokens=60,
            )  # fmt: skip
            (call,) = [item for item in called.output if item.type == "function_call"]
            assert call.name == "get_weather" and json.loads(call.arguments)["city"], call
            answered = await sdk.responses.create(
                model=model,
                input=[
                    {"role": "user", "content": ASK_WEATHER},
                    *(item.model_dump() for item in called.output),
                    {"type": "function_call_output", "call_id": call.call_id, "output": "18 degrees, clear sky"},
                ],
                tools=[WEATHER],
                tool_choice="none",
                temperature=0.7,
                max_output_tokens=16,
            )
        assert all(item.type == "message" for item in answered.output)
        return answered.output_text

    answers = await asyncio.gather(*(one(i) for i in range(10)))
    assert all(answers)


async def test_a_streamed_function_call_assembles_to_the_plain_one(sdk):
    model = await _model(sdk)
    asked = {"model": model, "input": ASK_WEATHER, "tools": [WEATHER], "temperature": 0, "max_output_tokens": 60}
    asked["tool_choice"] = {"type": "function", "name": "get_weather"}
    whole = await sdk.responses.create(**asked)
    arguments, final = "", None
    async for event in await sdk.responses.create(**asked, stream=True):
        if event.type == "response.function_call_arguments.delta":
            arguments += event.delta
        if event.type == "response.completed":
            final = event.response
    (call,) = [item for item in whole.output if item.type == "function_call"]
    assert arguments == call.arguments
    assert final is not None and _without_ids(final) == _without_ids(whole)


async def test_text_format_json_schema_holds_to_the_schema(sdk):
    model = await _model(sdk)
    schema = {
        "type": "object",
        "properties": {"river": {"type": "string", "maxLength": 30}, "length_km": {"type": "integer"}},
        "required": ["river", "length_km"],
        "additionalProperties": False,
    }
    reply = await sdk.responses.create(
        model=model,
        input="Name a long river.",
        text={"format": {"type": "json_schema", "name": "river", "schema": schema, "strict": True}},
        max_output_tokens=60,
        temperature=0,
    )
    answer = json.loads(reply.output_text)
    assert set(answer) == {"river", "length_km"} and isinstance(answer["length_km"], int), answer


async def test_what_a_stateless_server_cannot_do_is_refused_by_name(sdk):
    model = await _model(sdk)
    for asked, says in [
        ({"previous_response_id": "resp_1"}, "stateless"),
        ({"tools": [{"type": "web_search"}]}, "only function tools"),
        ({"background": True}, "background"),
    ]:
        with pytest.raises(openai.BadRequestError) as refused:
            await sdk.responses.create(model=model, input="Hi", max_output_tokens=4, **asked)
        assert says in refused.value.message, refused.value.message


async def test_the_openai_agents_sdk_runs_an_agent_with_a_function_tool(server):
    """The agents SDK's default model speaks the Responses API: a run with a tool, plain and streamed."""
    agents = pytest.importorskip("agents")
    asked_for: list[str] = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        asked_for.append(city)
        return f"18 degrees and clear in {city}"

    agents.set_tracing_disabled(True)  # tracing would upload to OpenAI
    client = AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
    model = (await client.models.list()).data[0].id
    agent = agents.Agent(
        name="weather",
        instructions="Answer with the tool.",
        tools=[get_weather],
        model=agents.OpenAIResponsesModel(model=model, openai_client=client),
        model_settings=agents.ModelSettings(tool_choice="required", temperature=0, max_tokens=60),
    )
    result = await agents.Runner.run(agent, "What is the weather in Paris?", max_turns=4)
    assert asked_for == ["Paris"] and result.final_output
    streamed = agents.Runner.run_streamed(agent, "What is the weather in Oslo?", max_turns=4)
    kinds = [event.type async for event in streamed.stream_events()]
    assert asked_for == ["Paris", "Oslo"] and streamed.final_output and "raw_response_event" in kinds
    await client.close()
