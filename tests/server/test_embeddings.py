"""`/v1/embeddings` in every serving pattern (simulated engine): OpenAI's shapes, a batch in order,
base64, refusals, and the same admission as generation. The default model's vectors are measured
in tests/e2e/test_model_embeddings.py."""

from __future__ import annotations

import asyncio
import base64

import numpy as np
import pytest

from tests.conftest import asgi_client, sim_settings

SENTENCES = [f"sentence number {i} about queues and tokens" for i in range(16)]


def vector(item: dict) -> np.ndarray:
    return np.array(item["embedding"], dtype=np.float32)


async def test_one_input_gives_one_unit_vector_in_openais_shape(client):
    reply = await client.post("/v1/embeddings", json={"input": "hello there", "model": "simulated"})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["object"] == "list" and body["model"] == "simulated"
    [item] = body["data"]
    assert item["object"] == "embedding" and item["index"] == 0
    assert abs(np.linalg.norm(vector(item)) - 1) < 1e-5
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0


async def test_a_batch_of_16_comes_back_in_order_and_the_same_input_gives_the_same_vector(client):
    batch = (await client.post("/v1/embeddings", json={"input": SENTENCES})).json()["data"]
    assert [item["index"] for item in batch] == list(range(16))
    for i in (0, 7, 15):
        alone = (await client.post("/v1/embeddings", json={"input": SENTENCES[i]})).json()["data"][0]
        assert np.allclose(vector(alone), vector(batch[i]), atol=1e-6)
    assert not np.allclose(vector(batch[0]), vector(batch[1]))


async def test_base64_carries_the_same_float32_values(client):
    floats = (await client.post("/v1/embeddings", json={"input": "hi"})).json()["data"][0]["embedding"]
    encoded = (await client.post("/v1/embeddings", json={"input": "hi", "encoding_format": "base64"})).json()
    decoded = np.frombuffer(base64.b64decode(encoded["data"][0]["embedding"]), dtype="<f4")
    assert np.array_equal(decoded, np.array(floats, dtype=np.float32))


async def test_token_ids_are_inputs_too(client):
    tokens = (await client.post("/tokenize", json={"prompt": "hello there"})).json()["tokens"]
    by_text = (await client.post("/v1/embeddings", json={"input": "hello there"})).json()["data"][0]
    by_ids = (await client.post("/v1/embeddings", json={"input": tokens})).json()["data"][0]
    batch = (await client.post("/v1/embeddings", json={"input": [tokens, tokens]})).json()["data"]
    assert np.allclose(vector(by_text), vector(by_ids)) and len(batch) == 2


@pytest.mark.parametrize(
    ("body", "param", "says"),
    [
        ({"input": "hi", "dimensions": 8}, "dimensions", "dimensions is not supported"),
        ({"input": ""}, "input", "must not be empty"),
        ({"input": []}, "input", "between 1 and 2048"),
        ({"input": ["a", ""]}, "input", "must not be empty"),
        ({"input": 5}, "input", ""),
        ({"input": [10**9]}, "input", "outside the vocabulary"),
        ({"input": "hi", "encoding_format": "int8"}, "encoding_format", ""),
        ({"input": "word " * 5000}, "input", "embeds at most"),
        ({"input": "hi", "model": "gpt-4"}, "model", "does not exist"),
    ],
)
async def test_bad_embedding_requests_get_a_clear_4xx(client, body, param, says):
    reply = await client.post("/v1/embeddings", json=body)
    assert 400 <= reply.status_code < 500, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and says in error["message"]


async def test_the_native_width_may_be_asked_for():
    async with asgi_client(sim_settings()) as client:
        reply = await client.post("/v1/embeddings", json={"input": "hi", "dimensions": 64})
    assert reply.status_code == 200 and len(reply.json()["data"][0]["embedding"]) == 64


async def test_embeddings_wait_behind_the_same_admission_as_generation():
    async with asgi_client(sim_settings(sim_itl_ms=20, max_concurrency=1, max_queue=0)) as client:
        # ignore_eos: an unseeded simulated reply may end by itself within the 0.2 s (about 1 run in 100)
        generation = {"prompt": "x", "max_tokens": 30, "ignore_eos": True}
        busy = asyncio.ensure_future(client.post("/v1/completions", json=generation))
        await asyncio.sleep(0.2)
        refused = await client.post("/v1/embeddings", json={"input": "hi"})
        await busy
        served = await client.post("/v1/embeddings", json={"input": "hi"})
        metrics = (await client.get("/metrics")).text
    assert refused.status_code == 503 and "Retry-After" in refused.headers
    assert served.status_code == 200
    assert 'tokenmill_requests_total{route="/v1/embeddings",status="503"} 1.0' in metrics
    assert 'tokenmill_rejections_total{reason="overloaded"} 1.0' in metrics
