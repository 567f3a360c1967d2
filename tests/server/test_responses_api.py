"""OpenAI's Responses API over ASGI (simulated engine): input items into chat turns, the response
object, its numbered event stream, and what a stateless server refuses."""

from __future__ import annotations

import json

import pytest

from tests.conftest import asgi_client, sim_settings
from tests.server.test_anthropic_messages import events
from tokenmill.protocol.responses_api import ResponsesRequest

ASK = {"model": "simulated", "input": "Hi", "max_output_tokens": 12, "temperature": 0}


@pytest.fixture
async def client():
    async with asgi_client(sim_settings()) as c:
        yield c


def test_input_items_become_chat_turns():
    request = ResponsesRequest.model_validate(
        {
            "input": [
                {"role": "user", "content": "Weather in Oslo and Bergen?"},
                {"type": "reasoning", "id": "rs_1", "summary": []},
                {
                    "type": "message",
                    "role": "assistant",
                    "id": "msg_1",
                    "status": "completed",
                    "content": [{"type": "output_text", "text": "Checking.", "annotations": [], "logprobs": None}],
                },
                {"type": "function_call", "call_id": "c1", "name": "weather", "arguments": '{"city": "Oslo"}'},
                {"type": "function_call", "call_id": "c2", "name": "weather", "arguments": '{"city": "Bergen"}'},
                {"type": "function_call_output", "call_id": "c1", "output": "rain"},
                {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "sun"}]},
            ],
            "instructions": "Be brief.",
            "tools": [{"type": "function", "name": "weather", "parameters": {"type": "object"}}],
            "tool_choice": {"type": "function", "name": "weather"},
            "max_output_tokens": 7,
            "store": True,
        }
    )
    chat = request.to_chat()
    turns = [(m.role, m.content, m.tool_call_id, [c.id for c in m.tool_calls]) for m in chat.chat_messages()]
    assert turns == [
        ("system", "Be brief.", None, []),
        ("user", "Weather in Oslo and Bergen?", None, []),
        ("assistant", "Checking.", None, ["c1", "c2"]),
        ("tool", "rain", "c1", []),
        ("tool", "sun", "c2", []),
    ]
    assert [t.name for t in chat.forced_tools()] == ["weather"] and chat.max_tokens == 7


async def test_a_response_object(client):
    response = await client.post("/v1/responses", json={**ASK, "instructions": "Be brief.", "metadata": {"a": "b"}})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "response" and body["id"].startswith("resp") and body["model"] == "simulated"
    assert body["status"] == "incomplete" and body["incomplete_details"] == {"reason": "max_output_tokens"}
    assert (body["instructions"], body["metadata"], body["store"]) == ("Be brief.", {"a": "b"}, False)
    (item,) = body["output"]
    assert item["type"] == "message" and item["role"] == "assistant" and item["content"][0]["type"] == "output_text"
    usage = body["usage"]
    assert usage["output_tokens"] == 12 and usage["total_tokens"] == usage["input_tokens"] + 12


async def test_the_stream_is_numbered_and_ends_with_the_whole_response(client):
    whole = (await client.post("/v1/responses", json=ASK)).json()
    streamed = events((await client.post("/v1/responses", json={**ASK, "stream": True})).text)
    names = [name for name, _ in streamed]
    assert names[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert names[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",
    ]
    assert set(names[4:-4]) == {"response.output_text.delta"}
    assert [data["sequence_number"] for _, data in streamed] == list(range(len(streamed)))
    text = "".join(data["delta"] for name, data in streamed if name == "response.output_text.delta")
    assert text == whole["output"][0]["content"][0]["text"] == streamed[-4][1]["text"]
    final = streamed[-1][1]["response"]
    strip = [{k: v for k, v in item.items() if k != "id"} for item in whole["output"]]
    assert [{k: v for k, v in item.items() if k != "id"} for item in final["output"]] == strip
    assert final["usage"] == whole["usage"] and final["status"] == whole["status"]
    assert streamed[0][1]["response"]["status"] == "in_progress" and streamed[0][1]["response"]["output"] == []


async def test_fields_that_change_nothing_are_accepted_and_counted(client):
    sent = {**ASK, "store": True, "reasoning": {"effort": "low"}, "include": ["reasoning.encrypted_content"]}
    sent |= {
        "truncation": "disabled",
        "prompt_cache_key": "k",
        "text": {"format": {"type": "text"}, "verbosity": "low"},
    }
    assert (await client.post("/v1/responses", json=sent)).status_code == 200
    metrics = (await client.get("/metrics")).text
    for field in ("store", "reasoning", "include", "truncation", "prompt_cache_key", "text.verbosity"):
        assert f'tokenmill_ignored_fields_total{{field="{field}"}} 1.0' in metrics, field


@pytest.mark.parametrize(
    ("change", "param", "says"),
    [
        ({"previous_response_id": "resp_1"}, "previous_response_id", "stateless"),
        ({"conversation": "conv_1"}, "conversation", "stateless"),
        ({"background": True}, "background", "background"),
        ({"tools": [{"type": "file_search", "vector_store_ids": []}]}, None, "only function tools"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, None, "stores none"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, None, "no images"),
        ({"tool_choice": "required"}, None, "tool_choice needs tools"),
        ({"frobnicate": 1}, "frobnicate", "Unrecognized request argument"),
    ],
)
async def test_what_is_not_built_is_refused_by_name(client, change, param, says):
    response = await client.post("/v1/responses", json={**ASK, **change})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert says in error["message"], error
    assert param is None or error["param"] == param


async def test_a_stream_that_fails_ends_with_an_error_event():
    async with asgi_client(sim_settings(sim_itl_ms=200, inter_token_timeout=0.05)) as client:
        response = await client.post("/v1/responses", json={**ASK, "stream": True})
    name, data = events(response.text)[-1]
    assert name == "error" and data["code"] and data["message"], data
    assert json.loads(json.dumps(data))["sequence_number"] > 0
