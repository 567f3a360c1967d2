"""`echo`, `logprobs` over the prompt, `max_tokens: 0` and vLLM's `prompt_logprobs` on /v1/completions,
in every serving mode (the simulated engine scores every token alike: what is checked here is the
shape and the bookkeeping; tests/engines and tests/e2e check the numbers against references)."""

from __future__ import annotations

import itertools
import json

import httpx
import pytest

from tests.conftest import asgi_client, sim_settings
from tests.server.test_chat_completions import sse_payloads

PROMPT = "Once upon a time there was"


async def _tokens(client: httpx.AsyncClient, text: str) -> list[int]:
    return (await client.post("/tokenize", json={"prompt": text})).json()["tokens"]


async def test_echo_with_max_tokens_0_scores_the_prompt_and_generates_nothing(client: httpx.AsyncClient):
    """lm-eval's loglikelihood request: the prompt back, each token's logprob, the first null."""
    body = {"prompt": PROMPT, "echo": True, "logprobs": 1, "max_tokens": 0, "temperature": 0}
    reply = (await client.post("/v1/completions", json=body)).json()
    choice = reply["choices"][0]
    tokens = await _tokens(client, PROMPT)
    assert choice["text"] == PROMPT and choice["finish_reason"] == "length"
    assert reply["usage"]["completion_tokens"] == 0 and reply["usage"]["prompt_tokens"] == len(tokens)
    logprobs = choice["logprobs"]
    assert len(logprobs["tokens"]) == len(tokens)  # (the simulated tokens' text is not the prompt's: tests/e2e)
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert all(isinstance(value, float) and value <= 0 for value in logprobs["token_logprobs"][1:])
    for token, alternatives in zip(logprobs["tokens"][1:], logprobs["top_logprobs"][1:], strict=True):
        assert token in alternatives and len(alternatives) <= 2
    offsets = logprobs["text_offset"]
    assert offsets[0] == 0 and offsets == sorted(offsets)
    assert [b - a for a, b in itertools.pairwise(offsets)] == [len(t) for t in logprobs["tokens"][:-1]]
    assert "prompt_logprobs" not in choice  # vLLM's list only when asked


async def test_echo_with_an_answer_puts_the_prompt_first_in_text_and_logprobs(client: httpx.AsyncClient):
    body = {"prompt": PROMPT, "max_tokens": 5, "temperature": 0, "ignore_eos": True, "logprobs": 0}
    plain = (await client.post("/v1/completions", json=body)).json()["choices"][0]
    echoed = (await client.post("/v1/completions", json={**body, "echo": True})).json()["choices"][0]
    assert echoed["text"] == PROMPT + plain["text"]
    prompt_tokens = len(await _tokens(client, PROMPT))
    assert echoed["logprobs"]["tokens"][prompt_tokens:] == plain["logprobs"]["tokens"]
    assert echoed["logprobs"]["token_logprobs"][prompt_tokens:] == plain["logprobs"]["token_logprobs"]
    assert echoed["logprobs"]["text_offset"][prompt_tokens] == len(PROMPT)  # where the answer's text starts
    # echo without logprobs: the text only, and the prompt is not scored (the prefix cache may serve it)
    text_only = (await client.post("/v1/completions", json={**body, "echo": True, "logprobs": None})).json()
    assert text_only["choices"][0]["text"] == echoed["text"] and text_only["choices"][0]["logprobs"] is None


async def test_vllm_prompt_logprobs_are_keyed_by_token_id_with_rank(client: httpx.AsyncClient):
    body = {"prompt": PROMPT, "max_tokens": 2, "prompt_logprobs": 3, "temperature": 0}
    choice = (await client.post("/v1/completions", json=body)).json()["choices"][0]
    tokens = await _tokens(client, PROMPT)
    prompt = choice["prompt_logprobs"]
    assert len(prompt) == len(tokens) and prompt[0] is None
    for token, entry in zip(tokens[1:], prompt[1:], strict=True):
        assert str(token) in entry and entry[str(token)]["rank"] >= 1
        assert 3 <= len(entry) <= 4 and all(e["logprob"] <= 0 and "decoded_token" in e for e in entry.values())
    assert choice["logprobs"] is None and not choice["text"].startswith(PROMPT)


@pytest.mark.parametrize(
    "extra",
    [{"echo": True, "logprobs": 2, "max_tokens": 0}, {"echo": True, "logprobs": 1, "max_tokens": 4}, {"echo": True}],
    ids=["scored-prompt-only", "scored-and-answer", "text-only"],
)
async def test_streamed_echo_assembles_to_the_body(client: httpx.AsyncClient, extra):
    body = {"prompt": PROMPT, "temperature": 0, "ignore_eos": True, "max_tokens": 4, **extra}
    whole = (await client.post("/v1/completions", json=body)).json()["choices"][0]
    streamed = await client.post("/v1/completions", json={**body, "stream": True})
    payloads = sse_payloads(streamed.text)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p)["choices"][0] for p in payloads[:-1]]
    assert chunks[0]["text"].startswith(PROMPT)  # the prompt comes first, in one chunk
    assert "".join(c["text"] for c in chunks) == whole["text"]
    if whole["logprobs"] is not None:
        lists = [c["logprobs"] for c in chunks if c["logprobs"]]
        for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            assert [item for part in lists for item in part[key]] == whole["logprobs"][key], key


async def test_n_choices_each_echo_the_prompt():
    async with asgi_client(sim_settings(mode="batch")) as client:
        body = {"prompt": PROMPT, "n": 3, "echo": True, "logprobs": 1, "max_tokens": 3, "seed": 7}
        choices = (await client.post("/v1/completions", json=body)).json()["choices"]
        assert sorted(c["index"] for c in choices) == [0, 1, 2]
        assert all(c["text"].startswith(PROMPT) and c["logprobs"]["token_logprobs"][0] is None for c in choices)
