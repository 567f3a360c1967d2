"""`/v1/rerank` (Cohere's and Jina's shape) and `/v1/score` (vLLM's) over ASGI, in every serving
mode: the order, top_n, the shapes and the errors; the scores are the cosine similarities of what
`/v1/embeddings` returns for the same texts (tests/e2e/test_model_embeddings.py: the real model)."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

QUERY = "graceful drain"
DOCUMENTS = ["steady retry backoff", "graceful drain", "bounded timeout", "fast engine"]


async def _vectors(client: httpx.AsyncClient, texts: list[str]) -> list[np.ndarray]:
    data = (await client.post("/v1/embeddings", json={"input": texts})).json()["data"]
    return [np.array(item["embedding"]) for item in data]


async def test_rerank_orders_the_documents_by_cosine_similarity(client: httpx.AsyncClient):
    query, *documents = await _vectors(client, [QUERY, *DOCUMENTS])
    expected = [float(query @ d) for d in documents]
    reply = await client.post("/v1/rerank", json={"query": QUERY, "documents": DOCUMENTS})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    results = body["results"]
    assert [r["index"] for r in results] == sorted(range(4), key=lambda i: -expected[i])
    assert results[0]["index"] == 1 and results[0]["relevance_score"] == pytest.approx(1.0)
    assert [r["relevance_score"] for r in results] == pytest.approx(sorted(expected, reverse=True), abs=1e-6)
    assert [r["document"]["text"] for r in results] == [DOCUMENTS[r["index"]] for r in results]
    assert body["usage"]["total_tokens"] > 0 and body["model"] == "simulated"


async def test_rerank_top_n_objects_and_no_documents_back(client: httpx.AsyncClient):
    asked = {"query": QUERY, "documents": [{"text": d} for d in DOCUMENTS], "top_n": 2, "return_documents": False}
    results = (await client.post("/v2/rerank", json=asked)).json()["results"]
    assert len(results) == 2 and all(set(r) == {"index", "relevance_score"} for r in results)
    whole = (await client.post("/rerank", json={"query": QUERY, "documents": DOCUMENTS})).json()["results"]
    assert results == [{"index": r["index"], "relevance_score": r["relevance_score"]} for r in whole[:2]]


async def test_score_one_against_many_and_pair_by_pair(client: httpx.AsyncClient):
    vectors = await _vectors(client, [QUERY, *DOCUMENTS])
    one = (await client.post("/v1/score", json={"text_1": QUERY, "text_2": DOCUMENTS})).json()
    assert one["object"] == "list" and [d["index"] for d in one["data"]] == [0, 1, 2, 3]
    assert [d["score"] for d in one["data"]] == pytest.approx([float(vectors[0] @ v) for v in vectors[1:]], abs=1e-6)
    pairs = (await client.post("/score", json={"text_1": DOCUMENTS[:2], "text_2": DOCUMENTS[2:]})).json()
    assert [d["score"] for d in pairs["data"]] == pytest.approx(
        [float(vectors[1] @ vectors[3]), float(vectors[2] @ vectors[4])], abs=1e-6
    )


@pytest.mark.parametrize(
    ("path", "body", "says"),
    [
        ("/v1/rerank", {"query": QUERY, "documents": []}, "documents"),
        ("/v1/rerank", {"query": "", "documents": ["a"]}, "query"),
        ("/v1/rerank", {"query": QUERY, "documents": ["a", ""]}, "empty"),
        ("/v1/rerank", {"query": QUERY, "documents": ["a"], "top_n": 0}, "top_n"),
        ("/v1/rerank", {"query": QUERY, "documents": ["a"], "model": "other"}, "does not exist"),
        ("/v1/score", {"text_1": ["a", "b"], "text_2": ["a", "b", "c"]}, "as many"),
        ("/v1/score", {"text_1": "a", "text_2": []}, "non-empty"),
    ],
)
async def test_bad_requests_get_400_or_404(client: httpx.AsyncClient, path, body, says):
    reply = await client.post(path, json=body)
    assert reply.status_code in (400, 404), reply.text
    assert says in reply.json()["error"]["message"] or reply.json()["error"]["param"] == says
