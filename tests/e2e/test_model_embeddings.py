"""`/v1/embeddings` with the default model, through the official SDK on a real `tokenmill serve`
(llama.cpp), `/v1/rerank` and `/v1/score` from the same vectors, and the torch engine's embedder
against llama.cpp's on the same weights."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
from openai import AsyncOpenAI

from tokenmill.bench.spawn import SpawnedServer
from tokenmill.engines.embeddings import LlamaCppEmbedder
from tokenmill.engines.llamacpp import load_tokenizer
from tokenmill.engines.model_files import default_model_path

pytestmark = pytest.mark.slow  # a model load; runs in CI too

ANCHOR = "The cat sat on the mat."
PARAPHRASE = "A cat was sitting on the rug."
UNRELATED = "Interest rates rose by half a percent this quarter."


@pytest.fixture(scope="module")
def server():
    with SpawnedServer(["--context-window", "2048"]) as server:
        yield server


@pytest.fixture
async def sdk(server):
    async with AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120) as client:
        yield client


async def _embed(sdk: AsyncOpenAI, inputs: list[str]) -> list[np.ndarray]:
    model = (await sdk.models.list()).data[0].id
    reply = await sdk.embeddings.create(model=model, input=inputs)  # the SDK asks for base64 and decodes it
    assert [item.index for item in reply.data] == list(range(len(inputs)))
    return [np.array(item.embedding) for item in reply.data]


async def test_same_input_same_vector_and_a_paraphrase_is_nearer_than_an_unrelated_sentence(sdk):
    anchor, paraphrase, unrelated = await _embed(sdk, [ANCHOR, PARAPHRASE, UNRELATED])
    [again] = await _embed(sdk, [ANCHOR])
    assert np.array_equal(anchor, again)
    assert abs(np.linalg.norm(anchor) - 1) < 1e-5
    assert float(anchor @ paraphrase) > float(anchor @ unrelated)


async def test_rerank_and_score_are_the_embeddings_cosine_similarities(sdk, server):
    vectors = await _embed(sdk, [ANCHOR, PARAPHRASE, UNRELATED])
    expected = [float(vectors[0] @ v) for v in vectors[1:]]
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
        reranked = (
            await client.post("/v1/rerank", json={"query": ANCHOR, "documents": [UNRELATED, PARAPHRASE]})
        ).json()
        scored = (await client.post("/v1/score", json={"text_1": ANCHOR, "text_2": [PARAPHRASE, UNRELATED]})).json()
    assert [r["index"] for r in reranked["results"]] == [1, 0]  # the paraphrase first
    assert [r["document"]["text"] for r in reranked["results"]] == [PARAPHRASE, UNRELATED]
    assert [r["relevance_score"] for r in reranked["results"]] == pytest.approx(expected, abs=1e-5)
    assert [d["score"] for d in scored["data"]] == pytest.approx(expected, abs=1e-5)
    assert reranked["usage"]["total_tokens"] == scored["usage"]["total_tokens"] > 0


async def test_a_batch_of_16_returns_16_vectors_in_order(sdk):
    inputs = [f"Item {i}: {text}" for i, text in enumerate([ANCHOR, PARAPHRASE, UNRELATED] * 5 + ["last"])]
    batch = await _embed(sdk, inputs)
    assert len(batch) == 16
    for i in (0, 9, 15):
        [alone] = await _embed(sdk, [inputs[i]])
        assert np.allclose(alone, batch[i], atol=1e-5)


def test_the_torch_embedder_agrees_with_llama_cpps_on_the_same_weights():
    pytest.importorskip("torch")
    from tokenmill.engines.torchlm.embedder import TorchEmbedder

    path = default_model_path()
    tokens = [load_tokenizer(path, 512).encode(text) for text in (ANCHOR, PARAPHRASE, UNRELATED)]
    reference = LlamaCppEmbedder(path, 512, threads=2)
    try:
        expected = reference.embed(tokens)
    finally:
        reference.close()
    got = TorchEmbedder(path, 512).embed(tokens)
    for mine, theirs in zip(got, expected, strict=True):
        assert float(mine @ theirs) > 0.99  # bf16 against Q4_1 arithmetic: close (0.999 measured), not equal
    assert float(got[0] @ got[1]) > float(got[0] @ got[2])
