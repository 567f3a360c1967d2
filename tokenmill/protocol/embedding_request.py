"""OpenAI's `/v1/embeddings` request body. No I/O."""

from __future__ import annotations

from typing import Literal

from pydantic import field_validator

from tokenmill.protocol.strict import StrictModel

MAX_EMBEDDING_INPUTS = 2048  # OpenAI's limit


class EmbeddingRequest(StrictModel):
    """OpenAI's `/v1/embeddings`: one input or a batch, as text or token ids."""

    input: str | list[str] | list[int] | list[list[int]]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None

    @field_validator("input")
    @classmethod
    def _some_input(cls, value: str | list) -> str | list:
        if isinstance(value, list) and not 1 <= len(value) <= MAX_EMBEDDING_INPUTS:
            raise ValueError(f"input must hold between 1 and {MAX_EMBEDDING_INPUTS} items")
        if value == "" or (isinstance(value, list) and any(item in ("", []) for item in value)):
            raise ValueError("input must not be empty")
        return value

    def inputs(self) -> list[str] | list[list[int]]:
        """The batch, in order: texts or token id lists."""
        value = self.input
        if isinstance(value, str):
            return [value]
        if value and isinstance(value[0], int):
            return [value]  # type: ignore[list-item]  # one input given as token ids
        return value  # type: ignore[return-value]
