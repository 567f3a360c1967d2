"""Bad input gets a clear OpenAI-style 4xx JSON error, never a 500, and the server keeps serving."""

from __future__ import annotations

import httpx
import pytest

USER = [{"role": "user", "content": "hi"}]

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]

BAD_CHAT_REQUESTS = [
    pytest.param(b"{not json", "not valid JSON", None, id="malformed-json"),
    pytest.param(b"[1, 2]", "Invalid", None, id="body-not-an-object"),
    pytest.param({"max_tokens": 5}, "Missing required parameter: 'messages'", "messages", id="missing-messages"),
    pytest.param({"messages": []}, "at least 1 item", "messages", id="empty-messages"),
    pytest.param({"messages": "hi"}, "messages", "messages", id="messages-wrong-type"),
    pytest.param({"messages": [{"role": "wizard", "content": "x"}]}, "role", "messages.0.role", id="unknown-role"),
    pytest.param({"messages": [{"role": "user"}]}, "needs content", "messages.0", id="message-without-content"),
    pytest.param({"messages": USER, "max_tokens": 0}, "max_tokens", "max_tokens", id="max-tokens-zero"),
    pytest.param({"messages": USER, "max_tokens": -3}, "max_tokens", "max_tokens", id="max-tokens-negative"),
    pytest.param({"messages": USER, "max_tokens": "12"}, "valid integer", "max_tokens", id="max-tokens-string"),
    pytest.param(
        {"messages": USER, "max_tokens": 10**7}, "maximum context length", "messages", id="max-tokens-beyond-window"
    ),
    pytest.param({"messages": USER, "temperature": 3.5}, "temperature", "temperature", id="temperature-too-high"),
    pytest.param(
        b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
        "finite",
        "temperature",
        id="temperature-nan",
    ),
    pytest.param({"messages": USER, "top_p": 0}, "top_p", "top_p", id="top-p-zero"),
    pytest.param({"messages": USER, "n": 17}, "n must be between", "n", id="n-above-16"),
    pytest.param({"messages": USER, "n": 0}, "n must be between", "n", id="n-zero"),
    pytest.param({"messages": USER, "stop": [""]}, "stop", "stop", id="empty-stop-string"),
    pytest.param({"messages": USER, "stop": ["x"] * 17}, "stop", "stop", id="too-many-stops"),
    pytest.param({"messages": USER, "stream": "yes"}, "stream", "stream", id="stream-not-bool"),
    pytest.param(
        {"messages": USER, "frobnicate": 1},
        "Unrecognized request argument supplied: 'frobnicate'",
        "frobnicate",
        id="unknown-field",
    ),
    pytest.param(
        {"messages": USER, "tools": [{"type": "function"}]}, "function", "tools.0.function", id="tool-no-function"
    ),
    pytest.param(
        {"messages": USER, "tools": [{"type": "function", "function": {"name": "no spaces"}}]},
        "pattern",
        "tools.0.function.name",
        id="tool-name-pattern",
    ),
    pytest.param({"messages": USER, "tool_choice": "required"}, "tool_choice needs tools", None, id="choice-no-tools"),
    pytest.param(
        {"messages": USER, "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "other"}}},
        "not among the tools",
        None,
        id="choice-names-unknown-tool",
    ),
    pytest.param(
        {"messages": USER, "tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
        "cannot be combined",
        None,
        id="forced-call-and-response-format",
    ),
    pytest.param(
        {"messages": USER, "tools": TOOLS, "tool_choice": "required"},
        "GGUF vocabulary",  # a forced call is constrained decoding: the simulated engine cannot
        "tools",
        id="forced-call-on-the-simulated-engine",
    ),
    pytest.param(
        {"messages": [*USER, {"role": "tool", "content": "42"}]}, "tool_call_id", "messages.1", id="tool-without-id"
    ),
    pytest.param(
        {"messages": [{"role": "user", "content": "x", "tool_calls": []}]},
        "only assistant",
        "messages.0",
        id="user-calls",
    ),
    pytest.param(
        {
            "messages": [
                {
                    "role": "assistant",
                    "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "[1]"}}],
                }
            ]
        },
        "JSON object",
        "messages.0.tool_calls.0.function.arguments",
        id="call-arguments-not-an-object",
    ),
    pytest.param(
        {"messages": USER, "stream_options": {"include_usage": True}},
        "only allowed when stream",
        None,
        id="stream-options-without-stream",
    ),
    pytest.param({"messages": USER, "min_tokens": 9, "max_tokens": 3}, "min_tokens", "min_tokens", id="min-above-max"),
    pytest.param({"messages": USER, "min_tokens": -1}, "min_tokens", "min_tokens", id="min-tokens-negative"),
    pytest.param({"messages": USER, "top_k": -2}, "top_k", "top_k", id="top-k-below-minus-one"),
    pytest.param(
        {"messages": USER, "frequency_penalty": 2.5}, "frequency_penalty", "frequency_penalty", id="frequency-too-high"
    ),
    pytest.param(
        {"messages": USER, "presence_penalty": -3}, "presence_penalty", "presence_penalty", id="presence-too-low"
    ),
    pytest.param(
        {"messages": USER, "repetition_penalty": 0}, "repetition_penalty", "repetition_penalty", id="repetition-zero"
    ),
    pytest.param({"messages": USER, "min_p": 1.5}, "min_p", "min_p", id="min-p-above-one"),
    pytest.param(
        {"messages": USER, "speculative_tokens": 33}, "between 0 and 32", "speculative_tokens", id="speculative-33"
    ),
    pytest.param({"messages": USER, "logit_bias": {"hello": 5}}, "token ids", "logit_bias", id="logit-bias-key"),
    pytest.param({"messages": USER, "logit_bias": {"5": 101}}, "between -100", "logit_bias", id="logit-bias-value"),
    pytest.param(
        {"messages": USER, "logprobs": True, "top_logprobs": 21}, "top_logprobs", "top_logprobs", id="top-logprobs-21"
    ),
    pytest.param({"messages": USER, "top_logprobs": 3}, "needs logprobs", None, id="top-logprobs-alone"),
    pytest.param(
        {"messages": USER, "response_format": {"type": "xml"}},
        "'text', 'json_object' or 'json_schema'",
        "response_format.type",
        id="response-format-type",
    ),
    pytest.param(
        {"messages": USER, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
        "json_schema.schema",
        None,
        id="json-schema-without-schema",
    ),
    pytest.param(
        {"messages": USER, "response_format": {"type": "json_object"}},
        "GGUF vocabulary",  # the simulated engine has no real vocabulary to constrain
        "response_format",
        id="json-object-on-the-simulated-engine",
    ),
    pytest.param(
        {"messages": USER, "response_format": {"type": "json_object"}, "ignore_eos": True},
        "ignore_eos",
        "ignore_eos",
        id="json-with-ignore-eos",
    ),
    pytest.param(
        {"messages": [{"role": "user", "content": "word " * 5000}]},
        "maximum context length",
        "messages",
        id="prompt-over-window",
    ),
    pytest.param(
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        "messages",
        None,
        id="image-part",
    ),
]


def _error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    return error


@pytest.mark.parametrize(("body", "says", "param"), BAD_CHAT_REQUESTS)
async def test_bad_chat_request_gets_clear_400(client: httpx.AsyncClient, body, says, param):
    if isinstance(body, bytes):
        response = await client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    else:
        response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    error = _error_of(response)
    assert error["type"] == "invalid_request_error"
    assert says in error["message"]
    if param is not None:
        assert error["param"] == param
    # and the server still serves normally afterwards
    ok = await client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 2})
    assert ok.status_code == 200


@pytest.mark.parametrize(
    "body",
    [
        {"prompt": ["a", "b"]},
        {"prompt": 5},
        {"prompt": ""},
        {"prompt": "hi", "max_tokens": 0},  # nothing to do: neither echo nor prompt_logprobs
        {"prompt": "hi", "max_tokens": -1, "echo": True},
        {"prompt": "hi", "echo": True, "logprobs": 21},
        {"prompt": "hi", "prompt_logprobs": 21},
        {"prompt": "hi", "prompt_logprobs": -1},
        {"prompt": "hi", "best_of": 3},
        {"prompt": "hi", "logprobs": 21},
        {"prompt": "hi", "logprobs": -1},
        {"prompt": "hi", "presence_penalty": 2.5},
    ],
)
async def test_bad_completion_request_gets_400(client: httpx.AsyncClient, body):
    response = await client.post("/v1/completions", json=body)
    assert response.status_code == 400, response.text
    assert _error_of(response)["type"] == "invalid_request_error"


async def test_streamed_request_is_validated_before_the_stream_starts(client: httpx.AsyncClient):
    body = {"messages": [{"role": "user", "content": "word " * 5000}], "stream": True}
    response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400
    assert _error_of(response)["code"] == "context_length_exceeded"


@pytest.mark.parametrize("params", [{}, {"prompt": "hi", "max_tokens": "many"}, {"prompt": "hi", "max_tokens": 0}])
async def test_bad_stream_query_gets_400(client: httpx.AsyncClient, params):
    response = await client.get("/stream", params=params)
    assert response.status_code == 400
    assert _error_of(response)["type"] == "invalid_request_error"


async def test_bad_generate_body_gets_400(client: httpx.AsyncClient):
    response = await client.post("/generate", json={"prompt": ["not", "a", "string"]})
    assert response.status_code == 400
    assert _error_of(response)["param"] == "prompt"


async def test_unknown_route_and_wrong_method_are_openai_shaped(client: httpx.AsyncClient):
    missing = await client.get("/v1/nothing")
    assert missing.status_code == 404
    _error_of(missing)
    wrong_method = await client.get("/v1/chat/completions")
    assert wrong_method.status_code == 405
    _error_of(wrong_method)


def test_sampling_ranges_are_checked_once_by_sampling_params():
    """The HTTP models check shapes; a range written there too would drift from SamplingParams'."""
    import dataclasses

    import annotated_types

    from tokenmill.protocol import ChatCompletionRequest, CompletionRequest, GenerateRequest
    from tokenmill.sampling import SamplingParams

    sampling = {f.name for f in dataclasses.fields(SamplingParams)} | {"max_completion_tokens"}
    bounds = (annotated_types.Ge, annotated_types.Gt, annotated_types.Le, annotated_types.Lt)
    for model in (ChatCompletionRequest, CompletionRequest, GenerateRequest):
        for name, field in model.model_fields.items():
            if name in sampling:
                assert not [m for m in field.metadata if isinstance(m, bounds)], f"{model.__name__}.{name}"
