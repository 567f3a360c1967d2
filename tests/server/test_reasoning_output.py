"""A reasoning model's thinking in every wire format: chat's `reasoning_content`, Anthropic's
`thinking` blocks, the Responses API's `reasoning` item; streamed, it assembles to the body.

The renderers are driven with a scripted generation (the simulated engine's words hold no tags),
cut wherever a tokenizer could cut; the whole route runs over ASGI with `--reasoning-parser think`
and a prefill that opens the thinking. tests/e2e/test_openai_surface.py does that on the real model."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field

import pytest

from tests.conftest import asgi_client, sim_settings
from tests.server.test_anthropic_messages import events as anthropic_events
from tests.server.test_chat_completions import sse_payloads
from tokenmill.generation import Finished, TextDelta, Usage
from tokenmill.protocol.responses_api import ResponsesRequest
from tokenmill.reasoning import REASONING_FORMATS, ReasoningSetup
from tokenmill.sampling import SamplingParams
from tokenmill.server import anthropic, responses_api, streams
from tokenmill.server.choice_text import ChoiceText

WRITTEN = "<think>\nThe user wants a sum. 2 + 2 = 4.\n</think>\n\nThe answer is 4."
THOUGHT, ANSWER = "\nThe user wants a sum. 2 + 2 = 4.\n", "The answer is 4."


@dataclass
class _Handle:
    prompt_tokens: int = 7
    request_id: str = "scripted"


@dataclass
class Scripted:
    """A generation that writes `pieces`, one delta each, and stops."""

    pieces: list[str]
    params: SamplingParams = field(default_factory=SamplingParams)
    handle: _Handle = field(default_factory=_Handle)

    async def events(self):
        for count, text in enumerate(self.pieces, start=1):
            yield TextDelta(text, generated=count)
        yield Finished("stop", Usage(7, len(self.pieces)))


def cuts() -> list[list[str]]:
    return [[WRITTEN], list(WRITTEN), [WRITTEN[:3], WRITTEN[3:15], WRITTEN[15:40], WRITTEN[40:]]]


def new_output(keep: bool = True):
    setup = ReasoningSetup(REASONING_FORMATS["think"])
    return functools.partial(ChoiceText, None, setup.parser, keep)


async def _bytes(stream) -> str:
    return b"".join([chunk async for chunk in stream]).decode()


@pytest.mark.parametrize("pieces", cuts())
async def test_chat_reasoning_content_streamed_and_whole(pieces):
    body = await streams.chat_completion([Scripted(pieces)], "c", 0, "m", new_output=new_output())
    message = body.choices[0].message
    assert (message.reasoning_content, message.content) == (THOUGHT, ANSWER)
    streamed = await _bytes(streams.chat_stream([Scripted(pieces)], "c", 0, "m", False, new_output=new_output()))
    deltas = [json.loads(p)["choices"][0]["delta"] for p in sse_payloads(streamed)[:-1]]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == THOUGHT
    assert "".join(d.get("content", "") for d in deltas) == ANSWER
    assert not any("<think>" in d.get("content", "") + d.get("reasoning_content", "") for d in deltas)
    # the reasoning first, then the answer: no content delta comes before the last reasoning one
    kinds = [("reasoning_content" in d, "content" in d and d["content"] != "") for d in deltas]
    last_thought = max(i for i, (thought, _) in enumerate(kinds) if thought)
    assert not any(said for _, said in kinds[:last_thought])
    # include_reasoning false: the answer alone
    plain = await streams.chat_completion([Scripted(pieces)], "c", 0, "m", new_output=new_output(keep=False))
    assert (plain.choices[0].message.reasoning_content, plain.choices[0].message.content) == (None, ANSWER)
    assert "reasoning_content" not in plain.choices[0].message.model_dump()


@pytest.mark.parametrize("pieces", cuts())
async def test_anthropic_thinking_block_streamed_and_whole(pieces):
    body = await anthropic.message_body([Scripted(pieces)], "msg", 0, "m", new_output=new_output())
    assert [block.model_dump() for block in body.content] == [
        {"type": "thinking", "thinking": THOUGHT, "signature": ""},
        {"type": "text", "text": ANSWER},
    ]
    streamed = anthropic_events(
        await _bytes(anthropic.message_stream([Scripted(pieces)], "msg", 0, "m", False, new_output=new_output()))
    )
    starts = [data["content_block"]["type"] for name, data in streamed if name == "content_block_start"]
    assert starts == ["thinking", "text"]
    deltas = [data for name, data in streamed if name == "content_block_delta"]
    assert "".join(d["delta"]["thinking"] for d in deltas if d["index"] == 0) == THOUGHT
    assert "".join(d["delta"]["text"] for d in deltas if d["index"] == 1) == ANSWER
    assert [data["index"] for name, data in streamed if name == "content_block_stop"] == [0, 1]


@pytest.mark.parametrize("pieces", cuts())
async def test_responses_reasoning_item_streamed_and_whole(pieces):
    asked = ResponsesRequest.model_validate({"model": "m", "input": "2 + 2?"})
    body = await responses_api.response_body([Scripted(pieces)], "resp", 0, "m", new_output=new_output(), asked=asked)
    output = body.model_dump()["output"]
    assert [item["type"] for item in output] == ["reasoning", "message"]
    assert output[0]["content"] == [{"type": "reasoning_text", "text": THOUGHT}]
    assert output[1]["content"][0]["text"] == ANSWER
    stream = responses_api.response_stream(
        [Scripted(pieces)], "resp", 0, "m", False, new_output=new_output(), asked=asked
    )
    streamed = anthropic_events(await _bytes(stream))  # the same `event:` + `data:` framing
    names = [name for name, _ in streamed]
    assert names.index("response.reasoning_text.done") < names.index("response.content_part.added")
    thought = "".join(data["delta"] for name, data in streamed if name == "response.reasoning_text.delta")
    assert thought == THOUGHT
    final = streamed[-1][1]["response"]
    assert [item["type"] for item in final["output"]] == ["reasoning", "message"]

    def contents(items):  # (the item ids differ per call)
        return [(item["type"], item["content"]) for item in items]

    assert contents(final["output"]) == contents(output)


async def test_a_prefill_that_opens_the_thinking_makes_the_answer_reasoning():
    """The whole route: `--reasoning-parser think`, an assistant prefill "<think>" that the model
    continues (the simulated words never close it, so all of the answer is reasoning)."""
    ask = {
        "messages": [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "<think>\n"}],
        "continue_final_message": True,
        "max_tokens": 8,
        "temperature": 0,
        "ignore_eos": True,
    }
    async with asgi_client(sim_settings(reasoning_parser="think")) as client:
        whole = (await client.post("/v1/chat/completions", json=ask)).json()
        message = whole["choices"][0]["message"]
        assert message["reasoning_content"] and message["content"] == ""
        hidden = (await client.post("/v1/chat/completions", json={**ask, "include_reasoning": False})).json()
        assert "reasoning_content" not in hidden["choices"][0]["message"]
        as_written = (await client.post("/v1/chat/completions", json={**ask, "reasoning_format": "none"})).json()
        assert as_written["choices"][0]["message"]["content"] == message["reasoning_content"]
        # the prefill is continued, not answered: the prompt is the question's and the prefill's,
        # with no closed assistant turn and no second one opened
        closed = (await client.post("/tokenize", json={"messages": ask["messages"]})).json()["count"]
        question = (await client.post("/tokenize", json={"messages": ask["messages"][:1]})).json()["count"]
        assert question < whole["usage"]["prompt_tokens"] < closed
        thinking = {"model": "simulated", "max_tokens": 8, "thinking": {"type": "enabled", "budget_tokens": 1024}}
        thinking["messages"] = [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "<think>"}]
        reply = (await client.post("/v1/messages", json=thinking)).json()
        assert [block["type"] for block in reply["content"]] == ["thinking"]
    async with asgi_client(sim_settings()) as client:  # auto: the simulated template writes no tags
        untouched = (await client.post("/v1/chat/completions", json=ask)).json()["choices"][0]["message"]
        assert "reasoning_content" not in untouched and untouched["content"] == message["reasoning_content"]
