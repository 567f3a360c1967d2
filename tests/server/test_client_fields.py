"""What OpenAI's own clients send: fields accepted and ignored (and counted), fields refused by name
with what to send instead, messages an SDK hands back, content parts, and --lenient-fields."""

from __future__ import annotations

import json

import httpx
import pytest
from openai.types.chat import ChatCompletionMessage

from tests.conftest import asgi_client, sim_settings
from tokenmill.json_schema import closed_objects
from tokenmill.protocol import ChatCompletionRequest

USER = {"role": "user", "content": "What is the weather in Paris?"}
CHAT = {"messages": [USER], "max_tokens": 4}


@pytest.fixture
async def client():
    async with asgi_client(sim_settings()) as c:
        yield c


async def _ignored_count(client: httpx.AsyncClient, field: str) -> float:
    for line in (await client.get("/metrics")).text.splitlines():
        if line.startswith(f'tokenmill_ignored_fields_total{{field="{field}"}}'):
            return float(line.split()[-1])
    return 0.0


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("store", False),
        ("metadata", {"app": "billing"}),
        ("reasoning_effort", "low"),
        ("service_tier", "auto"),
        ("prompt_cache_key", "conversation-7"),
        ("safety_identifier", "user-1234"),
        ("verbosity", "medium"),
        ("modalities", ["text"]),
        ("prediction", {"type": "content", "content": "It is sunny."}),
    ],
)
async def test_openai_fields_that_change_nothing_are_accepted_and_counted(client, field, value):
    response = await client.post("/v1/chat/completions", json={**CHAT, field: value})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"]
    assert await _ignored_count(client, field) == 1


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("functions", [{"name": "f", "parameters": {"type": "object"}}], "send tools"),
        ("function_call", "auto", "send tools and tool_choice"),
        ("audio", {"voice": "alloy", "format": "wav"}, "no audio"),
        ("web_search_options", {}, "no web search"),
        ("modalities", ["text", "audio"], "only text"),
    ],
)
async def test_fields_that_would_change_the_answer_are_refused_by_name_with_what_to_send(client, field, value, says):
    response = await client.post("/v1/chat/completions", json={**CHAT, field: value})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == field and says in error["message"], error


ASSISTANT = {"role": "assistant", "content": "Let me look."}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("refusal", None),
        ("annotations", [{"type": "url_citation", "url_citation": {"url": "https://example.org"}}]),
        ("audio", None),
        ("function_call", None),
        ("reasoning_content", "The user wants the weather."),
        ("reasoning", "The user wants the weather."),
        ("provider_specific_fields", {"citations": None}),
    ],
)
async def test_a_reply_message_sent_back_with_its_response_fields_is_accepted(client, field, value):
    sent_back = {**ASSISTANT, field: value}
    response = await client.post("/v1/chat/completions", json={**CHAT, "messages": [USER, sent_back, USER]})
    assert response.status_code == 200, response.text
    assert await _ignored_count(client, f"messages[].{field}") == (0 if value is None else 1)


async def test_a_streamed_tool_calls_index_is_accepted(client):
    call = {"id": "call_1", "type": "function", "index": 0, "function": {"name": "f", "arguments": "{}"}}
    messages = [USER, {"role": "assistant", "content": None, "tool_calls": [call]}]
    messages.append({"role": "tool", "tool_call_id": "call_1", "content": "{}"})
    response = await client.post("/v1/chat/completions", json={**CHAT, "messages": messages})
    assert response.status_code == 200, response.text
    assert await _ignored_count(client, "messages[].tool_calls[].index") == 1


async def test_the_sdks_own_message_model_dump_goes_back_as_it_is(client):
    """Exactly what `reply.choices[0].message.model_dump()` gives, tool call and nulls included."""
    message = ChatCompletionMessage.model_validate(
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
        }
    ).model_dump()
    assert {"refusal", "annotations", "audio", "function_call"} <= message.keys()
    tool = {"role": "tool", "tool_call_id": "call_1", "content": '{"ok": true}'}
    response = await client.post("/v1/chat/completions", json={**CHAT, "messages": [USER, message, tool]})
    assert response.status_code == 200, response.text


async def test_a_past_refusal_is_that_turns_text(client):
    async def prompt_ids(assistant: dict) -> list[int]:
        response = await client.post("/tokenize", json={"messages": [USER, assistant, USER]})
        assert response.status_code == 200, response.text
        return response.json()["tokens"]

    refused = await prompt_ids({"role": "assistant", "content": None, "refusal": "I cannot help with that."})
    assert refused == await prompt_ids({"role": "assistant", "content": "I cannot help with that."})


async def test_a_legacy_function_call_in_a_message_is_refused_by_name(client):
    past = {**ASSISTANT, "function_call": {"name": "f", "arguments": "{}"}}
    response = await client.post("/v1/chat/completions", json={**CHAT, "messages": [USER, past, USER]})
    assert response.status_code == 400
    assert "send the call in tool_calls" in response.json()["error"]["message"]


async def test_a_text_part_with_extra_keys_is_read_as_text(client):
    part = {"type": "text", "text": "What is the weather in Paris?", "cache_control": {"type": "ephemeral"}}
    response = await client.post(
        "/v1/chat/completions", json={**CHAT, "messages": [{"role": "user", "content": [part]}]}
    )
    assert response.status_code == 200, response.text
    assert await _ignored_count(client, "unknown") == 1


@pytest.mark.parametrize(
    ("part", "says"),
    [
        ({"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}, "this model takes no images"),
        ({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}, "this model takes no audio"),
        ({"type": "file", "file": {"file_id": "file-1"}}, "this model takes no files"),
    ],
)
async def test_parts_a_text_model_cannot_read_are_refused_by_what_they_are(client, part, says):
    content = [{"type": "text", "text": "What is this?"}, part]
    response = await client.post(
        "/v1/chat/completions", json={**CHAT, "messages": [{"role": "user", "content": content}]}
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert says in error["message"] and error["param"] == "messages.0.content", error


def test_json_object_with_a_schema_constrains_to_that_schema():
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    body = {**CHAT, "response_format": {"type": "json_object", "schema": schema}}
    grammar = ChatCompletionRequest.model_validate(body).to_sampling_params().grammar
    assert grammar is not None and json.loads(grammar.source) == closed_objects(schema)  # json_schema.py
    plain = ChatCompletionRequest.model_validate({**CHAT, "response_format": {"type": "json_object"}})
    assert json.loads(plain.to_sampling_params().grammar.source) == {"type": "object"}


async def test_response_format_keys_of_another_type_are_refused_not_dropped(client):
    schema = {"type": "object"}
    wrong = {"type": "json_schema", "schema": schema}  # the schema belongs in json_schema.schema
    response = await client.post("/v1/chat/completions", json={**CHAT, "response_format": wrong})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "response_format"


async def test_unknown_fields_are_refused_unless_the_server_is_lenient(client):
    odd = {**CHAT, "frobnicate": 3, "messages": [{**USER, "colour": "blue"}]}
    refused = await client.post("/v1/chat/completions", json=odd)
    assert refused.status_code == 400
    assert refused.json()["error"]["message"].startswith("Unrecognized request argument supplied")
    async with asgi_client(sim_settings(lenient_fields=True)) as lenient:
        accepted = await lenient.post("/v1/chat/completions", json=odd)
        assert accepted.status_code == 200, accepted.text
        assert await _ignored_count(lenient, "unknown") == 2
        still_typed = await lenient.post("/v1/chat/completions", json={**odd, "max_tokens": "4"})
        assert still_typed.status_code == 400  # lenient about names, never about types


async def test_a_content_part_whose_type_is_not_a_string_is_a_400(client):
    """Found by the schema fuzzer: an unhashable type made the part check raise."""
    content = [{"type": {}, "refusal": ""}]
    response = await client.post(
        "/v1/chat/completions", json={**CHAT, "messages": [{"role": "user", "content": content}]}
    )
    assert response.status_code == 400, response.text
