"""Load-test tokenmill (or any OpenAI-compatible server) with locust, measuring time to first token.

    pip install locust
    locust -f examples/locustfile.py --host http://127.0.0.1:8000 --headless -u 16 -r 4 -t 60s

Each simulated user streams chat completions back to back. locust's own row for the request
measures only the time to the response headers (it is a streamed response), so two extra rows
carry what matters for an LLM: "TTFT" (time to the first content token) and "ITL" (mean gap
between tokens), in milliseconds. Checked with locust 2.x against a simulated tokenmill server.
"""

from __future__ import annotations

import json
import os
import random
import time

from locust import HttpUser, between, task

PROMPTS = [
    "Explain how a lighthouse works.",
    "Write a haiku about autumn rain.",
    "Why is the sky blue?",
    "Give three tips for writing clear emails.",
]
MAX_TOKENS = int(os.environ.get("TOKENMILL_LOCUST_MAX_TOKENS", "64"))


class ChatUser(HttpUser):
    wait_time = between(0, 0.5)

    def on_start(self) -> None:
        self.model = self.client.get("/v1/models").json()["data"][0]["id"]

    @task
    def stream_chat(self) -> None:
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": random.choice(PROMPTS)}],
            "max_tokens": MAX_TOKENS,
            "ignore_eos": True,
            "stream": True,
        }
        started = time.perf_counter()
        first = last = None
        tokens = 0
        with self.client.post("/v1/chat/completions", json=body, stream=True, catch_response=True, name="chat (stream)") as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}")
                return
            for line in response.iter_lines(decode_unicode=True):
                if not line or not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    response.failure(chunk["error"].get("message", "error event"))
                    return
                if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                    now = time.perf_counter()
                    first = first or now
                    last = now
                    tokens += 1
            response.success()
        if first is not None:
            self._report("TTFT", (first - started) * 1000)
        if tokens > 1:
            self._report("ITL", (last - first) * 1000 / (tokens - 1))

    def _report(self, name: str, milliseconds: float) -> None:
        self.environment.events.request.fire(
            request_type="METRIC", name=name, response_time=milliseconds, response_length=0, exception=None, context={}
        )
