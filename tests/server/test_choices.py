"""n > 1: a request's n choices, admitted together, streamed interleaved, each with its own index."""

from __future__ import annotations

import asyncio
import json

import pytest

from tests.conftest import asgi_client, sim_settings
from tokenmill.server.admission import Admission

MESSAGES = [{"role": "user", "content": "Say something."}]


def _chat(**fields) -> dict:
    return {"messages": MESSAGES, "max_tokens": 12, "temperature": 0.9, **fields}


async def test_n_choices_are_reproducible_with_a_seed_and_differ_from_each_other():
    async with asgi_client(sim_settings(mode="batch", max_batch=8)) as client:
        first = (await client.post("/v1/chat/completions", json=_chat(n=4, seed=7, ignore_eos=True))).json()
        again = (await client.post("/v1/chat/completions", json=_chat(n=4, seed=7, ignore_eos=True))).json()
        single = (await client.post("/v1/chat/completions", json=_chat(seed=7))).json()
    texts = [choice["message"]["content"] for choice in first["choices"]]
    assert [choice["index"] for choice in first["choices"]] == [0, 1, 2, 3]
    assert texts == [choice["message"]["content"] for choice in again["choices"]]
    assert len(set(texts)) == 4
    usage = first["usage"]
    assert usage["completion_tokens"] == 4 * 12  # every choice's tokens
    assert usage["prompt_tokens"] == single["usage"]["prompt_tokens"]  # the shared prompt, once
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


async def test_streamed_choices_assemble_to_the_non_streamed_ones():
    async with asgi_client(sim_settings(mode="batch", max_batch=8)) as client:
        whole = (await client.post("/v1/chat/completions", json=_chat(n=3, seed=3))).json()
        parts, finishes, usage = {0: "", 1: "", 2: ""}, {}, None
        async with client.stream(
            "POST", "/v1/chat/completions", json=_chat(n=3, seed=3, stream=True, stream_options={"include_usage": True})
        ) as response:
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                for choice in chunk["choices"]:
                    parts[choice["index"]] += choice["delta"].get("content", "")
                    if choice["finish_reason"]:
                        finishes[choice["index"]] = choice["finish_reason"]
                usage = chunk.get("usage") or usage
    assert [parts[i] for i in range(3)] == [choice["message"]["content"] for choice in whole["choices"]]
    assert set(finishes) == {0, 1, 2}
    assert usage == whole["usage"]


async def test_a_request_holds_one_place_per_choice_and_gives_them_back():
    settings = sim_settings(mode="batch", max_batch=4, sim_itl_ms=20)
    async with asgi_client(settings) as client:
        serving = client._transport.app.state.serving  # type: ignore[attr-defined]
        running = asyncio.ensure_future(client.post("/v1/chat/completions", json=_chat(n=3, max_tokens=30)))
        await asyncio.sleep(0.2)
        assert serving.admission.active == 3
        assert (await running).status_code == 200
        assert serving.admission.active == 0


async def test_more_choices_than_the_server_runs_at_once_is_a_clear_400():
    async with asgi_client(sim_settings(mode="async", replicas=2)) as client:
        response = await client.post("/v1/chat/completions", json=_chat(n=3))
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "n" and "at most 2" in response.json()["error"]["message"]


async def test_places_are_taken_together_so_two_large_requests_never_hold_each_others():
    admission = Admission(capacity=2, max_queue=4, queue_timeout=2)
    small = await admission.acquire(1)
    waiting = [asyncio.ensure_future(admission.acquire(2)) for _ in range(2)]
    await asyncio.sleep(0.01)
    assert admission.active == 1 and admission.queued == 2  # neither took the one free place
    small.release()
    first = await asyncio.wait_for(waiting[0], 1)
    assert admission.active == 2 and not waiting[1].done()
    first.release()
    second = await asyncio.wait_for(waiting[1], 1)
    assert [t.release() for t in second.split()] == [None, None] and admission.active == 0


async def test_a_queued_large_request_that_leaves_lets_smaller_ones_in():
    admission = Admission(capacity=2, max_queue=4, queue_timeout=5)
    held = await admission.acquire(1)
    large = asyncio.ensure_future(admission.acquire(2))
    await asyncio.sleep(0.01)
    small = asyncio.ensure_future(admission.acquire(1))  # behind the large one: first come, first served
    await asyncio.sleep(0.01)
    assert not small.done()
    large.cancel()
    await asyncio.wait_for(small, 1)
    assert admission.active == 2
    held.release()


@pytest.mark.parametrize("path", ["/v1/completions"])
async def test_completions_take_n_too(path):
    async with asgi_client(sim_settings(mode="batch", max_batch=8)) as client:
        body = (await client.post(path, json={"prompt": "Once upon", "n": 2, "max_tokens": 5, "seed": 1})).json()
    assert [choice["index"] for choice in body["choices"]] == [0, 1]


async def test_a_queued_request_waits_until_all_its_places_are_free():
    admission = Admission(capacity=2, max_queue=4, queue_timeout=5)
    one, two = await admission.acquire(1), await admission.acquire(1)
    large = asyncio.ensure_future(admission.acquire(2))
    await asyncio.sleep(0.01)
    one.release()
    await asyncio.sleep(0.01)
    assert not large.done() and admission.active == 1  # one free place is not enough
    two.release()
    (await asyncio.wait_for(large, 1)).release()
    assert admission.active == 0
