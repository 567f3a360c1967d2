"""A blocking wrapper for scripts: the same client on a private event loop.

    llm = SyncLLMClient("http://127.0.0.1:8000")
    print(llm.chat([{"role": "user", "content": "Hi"}]).text)
    for text in llm.stream_chat([{"role": "user", "content": "Hi"}]):
        print(text, end="", flush=True)
    llm.close()

Not for use inside a running event loop (use LLMClient there).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from typing import Any, Self

from tokenmill.client.core import Completion, LLMClient


class SyncLLMClient:
    def __init__(self, base_url: str, **options: Any):
        self._loop = asyncio.new_event_loop()
        self._client = LLMClient(base_url, **options)

    def chat(self, messages: Sequence[dict[str, str]], **params: Any) -> Completion:
        return self._loop.run_until_complete(self._client.chat(messages, **params))

    def complete(self, prompt: str, **params: Any) -> Completion:
        return self._loop.run_until_complete(self._client.complete(prompt, **params))

    def stream_chat(self, messages: Sequence[dict[str, str]], **params: Any) -> Iterator[str]:
        return self._iterate(self._client.stream_chat(messages, **params))

    def stream_complete(self, prompt: str, **params: Any) -> Iterator[str]:
        return self._iterate(self._client.stream_complete(prompt, **params))

    def close(self) -> None:
        self._loop.run_until_complete(self._client.aclose())
        self._loop.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _iterate(self, stream) -> Iterator[str]:
        try:
            while True:
                try:
                    yield self._loop.run_until_complete(anext(stream))
                except StopAsyncIteration:
                    return
        finally:
            self._loop.run_until_complete(stream.aclose())
