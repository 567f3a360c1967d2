"""Relevance from the served model's embeddings: `/v1/rerank` (Cohere's and Jina's shape, as vLLM
and llama.cpp's server take it) and `/v1/score` (vLLM's). No I/O.

A pair's score is the cosine similarity of the two texts' embeddings (each a unit vector, so their
dot product), as vLLM scores with an embedding model: a bi-encoder reading query and document apart.
A cross-encoder reranker reads each (query, document) pair together and ranks far better; the
default model is neither, only a chat model whose pooled states carry some meaning.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, Field, field_validator, model_validator

from tokenmill.protocol.chat import MAX_PROMPT_CHARS
from tokenmill.protocol.strict import StrictModel

MAX_DOCUMENTS = 1024


class DocumentIn(StrictModel):
    text: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)


class RerankRequest(StrictModel):
    model: str | None = None
    query: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    documents: list[str | DocumentIn] = Field(min_length=1, max_length=MAX_DOCUMENTS)
    top_n: int | None = Field(None, ge=1)
    return_documents: bool = True  # Jina's and vLLM's default; Cohere's v2 API always returns them

    @field_validator("documents")
    @classmethod
    def _no_empty_document(cls, documents: list[str | DocumentIn]) -> list[str | DocumentIn]:
        if any(isinstance(d, str) and not d for d in documents):
            raise ValueError("documents must not be empty strings")
        return documents

    def texts(self) -> list[str]:
        return [d if isinstance(d, str) else d.text for d in self.documents]


class ScoreRequest(StrictModel):
    """vLLM's: `text_1` against `text_2`, one against many or pair by pair."""

    model: str | None = None
    text_1: str | list[str]
    text_2: str | list[str]

    @model_validator(mode="after")
    def _pairs(self) -> ScoreRequest:
        firsts, seconds = self.firsts(), self.seconds()
        if not firsts or not seconds or any(not t for t in (*firsts, *seconds)):
            raise ValueError("text_1 and text_2 must hold non-empty texts")
        if len(firsts) > 1 and len(firsts) != len(seconds):
            raise ValueError("text_1 holds several texts: text_2 must hold as many (they are scored pair by pair)")
        if len(seconds) > MAX_DOCUMENTS:
            raise ValueError(f"at most {MAX_DOCUMENTS} pairs per request")
        return self

    def firsts(self) -> list[str]:
        return [self.text_1] if isinstance(self.text_1, str) else self.text_1

    def seconds(self) -> list[str]:
        return [self.text_2] if isinstance(self.text_2, str) else self.text_2

    def pairs(self) -> list[tuple[int, int]]:
        """(index into firsts, index into seconds) per score, in order."""
        many = len(self.firsts()) > 1
        return [(i if many else 0, i) for i in range(len(self.seconds()))]


def similarities(queries: list[np.ndarray], documents: list[np.ndarray], pairs: list[tuple[int, int]]) -> list[float]:
    """Cosine similarity per (query, document) pair; the embeddings are unit vectors."""
    return [float(np.dot(queries[q], documents[d])) for q, d in pairs]


class RerankUsage(BaseModel):
    total_tokens: int


class RerankDocument(BaseModel):
    text: str


class RerankResult(BaseModel):
    index: int
    relevance_score: float
    document: RerankDocument | None = None


class RerankResponse(BaseModel):
    id: str
    model: str
    usage: RerankUsage
    results: list[RerankResult]


class ScoreData(BaseModel):
    index: int
    object: Literal["score"] = "score"
    score: float


class ScoreUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class ScoreResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[ScoreData]
    usage: ScoreUsage


def reranked(request: RerankRequest, scores: list[float]) -> list[RerankResult]:
    """The documents, most relevant first (ties: in the order given), the top_n of them."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])[: request.top_n]
    texts = request.texts()
    return [
        RerankResult(
            index=i,
            relevance_score=scores[i],
            document=RerankDocument(text=texts[i]) if request.return_documents else None,
        )
        for i in order
    ]
