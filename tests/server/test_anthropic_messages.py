"""Anthropic's Messages API over ASGI (simulated engine): the translation into a chat request, the
message body and its event stream, stop sequences, count_tokens, errors in Anthropic's shape."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.conftest import asgi_client, sim_settings
from tokenmill.protocol.anthropic import MessagesRequest

ASK = {"model": "simulated", "max_tokens": 12, "messages": [{"role": "user", "content": "Hi"}]}
GREEDY = {**ASK, "temperature": 0}


@pytest.fixture
async def client():
    async with asgi_client(sim_settings()) as c:
        yield c


def events(body: str) -> list[tuple[str, dict]]:
    """(event name, data) for each event of an SSE body."""
    out = []
    for block in body.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if not line.startswith(":"))
        out.append((lines["event"], json.loads(lines["data"])))
    return out


def test_turns_tools_and_choices_become_the_chat_request():
    request = MessagesRequest.model_validate(
        {
            "model": "m",
            "max_tokens": 9,
            "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
            "stop_sequences": ["END"],
            "messages": [
                {"role": "user", "content": "Weather in Oslo?"},
                {
                    "role": "assistant",
                    "content": [
                        {"type": "thinking", "thinking": "They want weather.", "signature": "sig"},
                        {"type": "text", "text": "Checking."},
                        {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Oslo"}},
                    ],
                },
                {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": "toolu_1", "content": "no such city", "is_error": True},
                        {"type": "text", "text": "Try Bergen."},
                    ],
                },
            ],
            "tools": [{"name": "weather", "input_schema": {"type": "object"}}],
            "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
        }
    )
    chat = request.to_chat()
    turns = [(m.role, m.content, m.tool_call_id) for m in chat.chat_messages()]
    assert turns == [
        ("system", "Be brief.", None),
        ("user", "Weather in Oslo?", None),
        ("assistant", "Checking.", None),
        ("tool", "Error: no such city", "toolu_1"),
        ("user", "Try Bergen.", None),
    ]
    (call,) = chat.chat_messages()[2].tool_calls
    assert (call.id, call.name, json.loads(call.arguments)) == ("toolu_1", "weather", {"city": "Oslo"})
    assert (chat.tool_choice, chat.parallel_tool_calls, chat.stop, chat.max_tokens) == ("required", False, ["END"], 9)
    assert [t.name for t in chat.forced_tools()] == ["weather"]


async def test_a_message_body_in_anthropics_shape(client):
    response = await client.post("/v1/messages", json=GREEDY)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["type"] == "message" and body["role"] == "assistant" and body["model"] == "simulated"
    assert body["id"].startswith("msg") and body["stop_reason"] == "max_tokens" and body["stop_sequence"] is None
    (block,) = body["content"]
    assert block["type"] == "text" and block["text"]
    assert body["usage"]["output_tokens"] == 12 and body["usage"]["input_tokens"] > 0


async def test_the_stream_is_anthropics_event_sequence_and_holds_the_same_message(client):
    whole = (await client.post("/v1/messages", json=GREEDY)).json()
    streamed = await client.post("/v1/messages", json={**GREEDY, "stream": True})
    assert streamed.headers["content-type"].startswith("text/event-stream")
    sequence = events(streamed.text)
    names = [name for name, _ in sequence]
    assert names[:2] == ["message_start", "content_block_start"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(names[2:-3]) == {"content_block_delta"}
    assert all(data["type"] == name for name, data in sequence)
    start = sequence[0][1]["message"]
    assert start["content"] == [] and start["usage"]["input_tokens"] == whole["usage"]["input_tokens"]
    text = "".join(data["delta"]["text"] for name, data in sequence if name == "content_block_delta")
    assert text == whole["content"][0]["text"]
    delta = sequence[-2][1]
    assert delta["delta"] == {"stop_reason": whole["stop_reason"], "stop_sequence": None}
    assert delta["usage"]["output_tokens"] == whole["usage"]["output_tokens"]


async def test_a_stop_sequence_is_named_in_the_answer(client):
    text = (await client.post("/v1/messages", json=GREEDY)).json()["content"][0]["text"]
    stop = text.split()[2]
    body = (await client.post("/v1/messages", json={**GREEDY, "stop_sequences": ["zzz", stop]})).json()
    assert (body["stop_reason"], body["stop_sequence"]) == ("stop_sequence", stop)
    assert stop not in body["content"][0]["text"]
    streamed = events(
        (await client.post("/v1/messages", json={**GREEDY, "stop_sequences": [stop], "stream": True})).text
    )
    assert streamed[-2][1]["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": stop}


async def test_count_tokens_is_the_prompt_a_message_would_have(client):
    system = {"system": "You are terse."}
    counted = await client.post(
        "/v1/messages/count_tokens", json={k: v for k, v in {**ASK, **system}.items() if k != "max_tokens"}
    )
    assert counted.status_code == 200, counted.text
    used = (await client.post("/v1/messages", json={**ASK, **system})).json()["usage"]["input_tokens"]
    assert counted.json() == {"input_tokens": used}
    tool = {"name": "weather", "description": "The weather.", "input_schema": {"type": "object"}}
    with_tool = await client.post(
        "/v1/messages/count_tokens", json={"model": "simulated", "messages": ASK["messages"], "tools": [tool]}
    )
    assert with_tool.json()["input_tokens"] > used


async def test_fields_that_change_nothing_are_accepted_and_counted(client):
    text = {"type": "text", "text": "Hi", "cache_control": {"type": "ephemeral"}}
    sent = {**ASK, "messages": [{"role": "user", "content": [text]}], "metadata": {"user_id": "u1"}}
    sent |= {"service_tier": "auto", "speed": "standard", "output_config": {"effort": "low"}}
    assert (await client.post("/v1/messages", json=sent)).status_code == 200
    metrics = (await client.get("/metrics")).text
    for field in ("metadata", "service_tier", "speed", "output_config.effort", "messages[].content[].cache_control"):
        assert f'tokenmill_ignored_fields_total{{field="{field}"}} 1.0' in metrics, field


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, "takes no images"),
        ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, "needs a model that reasons"),
        ({"tools": [{"type": "bash_20250124", "name": "bash"}]}, "only custom tools"),
        ({"mcp_servers": [{"type": "url", "url": "http://127.0.0.1:1", "name": "x"}]}, "no MCP servers"),
        (
            {"messages": [{"role": "user", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}]}]},
            "assistant",
        ),
        ({"max_tokens": 0}, "max_tokens"),
        ({"frobnicate": 1}, "Unrecognized request argument supplied: 'frobnicate'"),
        ({"tool_choice": {"type": "tool", "name": "absent"}}, "tool_choice"),
    ],
)
async def test_bad_requests_get_anthropic_error_bodies(client, change, says):
    response = await client.post("/v1/messages", json={**ASK, **change})
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert says in body["error"]["message"], body


async def test_http_level_errors_and_auth_speak_anthropic_too():
    async with asgi_client(sim_settings(api_key="sk-a")) as client:
        missing = await client.post("/v1/messages", json=ASK)
        assert missing.status_code == 401
        assert missing.json()["error"]["type"] == "authentication_error"
        assert "x-api-key" in missing.json()["error"]["message"]
        assert (await client.post("/v1/messages", json=ASK, headers={"x-api-key": "sk-a"})).status_code == 200
        assert (
            await client.post("/v1/chat/completions", json={"messages": ASK["messages"]}, headers={"x-api-key": "sk-a"})
        ).status_code == 200
        nowhere = await client.post("/v1/messages/batches", json={}, headers={"x-api-key": "sk-a"})
        assert nowhere.status_code == 404 and nowhere.json()["error"]["type"] == "not_found_error"
        openai = await client.post("/v1/nothing", json={}, headers={"x-api-key": "sk-a"})
        assert "type" not in openai.json()  # OpenAI's shape elsewhere: {"error": {...}}


async def test_a_stream_that_fails_ends_with_an_error_event():
    async with asgi_client(sim_settings(sim_itl_ms=200, inter_token_timeout=0.05)) as client:
        response = await client.post("/v1/messages", json={**ASK, "stream": True})
    sequence = events(response.text)
    assert sequence[0][0] == "message_start"
    name, data = sequence[-1]
    assert name == "error" and data["error"]["type"] == "timeout_error", data
    assert "message_stop" not in [n for n, _ in sequence]


async def test_overload_is_anthropics_overloaded_error():
    async with asgi_client(sim_settings(max_batch=1, replicas=1, max_queue=0, sim_itl_ms=50)) as client:
        first = client.post("/v1/messages", json={**ASK, "max_tokens": 20})
        import asyncio

        running = asyncio.ensure_future(first)
        await asyncio.sleep(0.05)
        refused: httpx.Response = await client.post("/v1/messages", json=ASK)
        await running
    assert refused.status_code == 503 and refused.headers["retry-after"]
    assert refused.json()["error"]["type"] == "overloaded_error"


def test_every_block_is_opened_filled_and_closed_in_turn():
    from tokenmill.generation import ToolCallDelta
    from tokenmill.server.anthropic import _Blocks

    blocks = _Blocks()
    raw = [*blocks.piece("Let me check. "), *blocks.piece("One moment.")]
    raw += [*blocks.piece(ToolCallDelta(0, '{"city": "Oslo"}', "call_1", "weather")), *blocks.piece("Done.")]
    raw += blocks.close()
    sequence = events(b"".join(raw).decode())
    shape = [(name, data.get("index")) for name, data in sequence]
    assert shape == [
        ("content_block_start", 0),
        ("content_block_delta", 0),
        ("content_block_delta", 0),
        ("content_block_stop", 0),
        ("content_block_start", 1),
        ("content_block_delta", 1),
        ("content_block_stop", 1),
        ("content_block_start", 2),
        ("content_block_delta", 2),
        ("content_block_stop", 2),
    ]
    assert sequence[4][1]["content_block"] == {"type": "tool_use", "id": "call_1", "name": "weather", "input": {}}
    assert sequence[5][1]["delta"] == {"type": "input_json_delta", "partial_json": '{"city": "Oslo"}'}
    assert blocks.called
