"""A seeded, repeatable workload: which prompts, how long the answers, how many requests."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from tokenmill.bench import quoting

# `--json`: every answer constrained to this schema (a long free-text field, so that answers run
# to max_tokens as the unconstrained ones do, and the two are compared on equal lengths)
ANSWER_SCHEMA = {
    "type": "object",
    "properties": {
        "topic": {"type": "string", "maxLength": 40},
        "kind": {"enum": ["fact", "story", "advice", "poem"]},
        "answer": {"type": "string", "maxLength": 4000},
    },
    "required": ["topic", "kind", "answer"],
    "additionalProperties": False,
}

# `--tools`: every request offers this tool. Its free-text argument must be long (minLength), so
# that a forced call runs to max_tokens as an unforced answer (ignore_eos) does, and the two compare
# on equal lengths (a short call would leave prefill a larger share of the time, and look slower).
NOTE_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "save_note",
        "description": "Save a note that answers the user's request.",
        "parameters": {
            "type": "object",
            "properties": {
                "title": {"type": "string", "maxLength": 40},
                "text": {"type": "string", "minLength": 2000, "maxLength": 4000},
            },
            "required": ["title", "text"],
            "additionalProperties": False,
        },
    },
}

# Shipped with the package so every run, on every machine, sends the same requests.
PROMPTS = (
    "Explain how a lighthouse works.",
    "Write a haiku about autumn rain.",
    "What are the main causes of ocean tides?",
    "Give three tips for writing clear emails.",
    "Describe the water cycle to a ten-year-old.",
    "Why is the sky blue?",
    "Summarise the plot of a detective story in two sentences.",
    "List five fruits that are high in vitamin C.",
    "How do vaccines train the immune system?",
    "Write a short poem about a cat on a windowsill.",
    "What is the difference between weather and climate?",
    "Explain recursion with a simple example.",
    "Suggest a name for a bakery and explain it.",
    "How does a bicycle stay upright?",
    "What should I pack for a weekend hiking trip?",
    "Describe the taste of a lemon to someone who has never had one.",
)


@dataclass(frozen=True)
class Workload:
    max_tokens: int = 64
    max_tokens_upper: int | None = None  # set: each request's length is drawn uniformly from [max_tokens, this]
    ignore_eos: bool = True  # every request really generates its max_tokens
    temperature: float = 0.7
    seed: int = 1234
    json: bool = False  # constrain every answer to ANSWER_SCHEMA (ignore_eos cannot apply then)
    tools: str | None = None  # offer NOTE_TOOL with this tool_choice: "auto" (free) or "required" (forced)
    task: str = "chat"  # or a task whose answers quote the prompt (bench/quoting.py)

    @classmethod
    def from_spec(cls, length: str, **kwargs) -> Workload:
        """'64' = every request 64 tokens; '32:128' = uniform between 32 and 128, per request."""
        low, _, high = length.partition(":")
        return cls(max_tokens=int(low), max_tokens_upper=int(high) if high else None, **kwargs)

    def request_body(self, index: int, model: str) -> dict:
        rng = random.Random(self.seed * 1_000_003 + index)
        length = rng.randint(self.max_tokens, self.max_tokens_upper) if self.max_tokens_upper else self.max_tokens
        body = {
            "model": model,
            "messages": [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": rng.choice(PROMPTS)},
            ],
            "max_tokens": length,
            "ignore_eos": self.ignore_eos,
            "temperature": self.temperature,
            "seed": rng.randrange(2**31),
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.task != "chat":  # greedy, each answer as long as the model makes it (up to max_tokens)
            body.update(messages=quoting.messages(self.task, rng), temperature=0.0, ignore_eos=False)
        if self.tools is not None:
            body["tools"] = [NOTE_TOOL]
            body["tool_choice"] = self.tools
            body["parallel_tool_calls"] = False
            if self.tools != "auto":  # a forced call is constrained decoding: it ends where its grammar does
                body["ignore_eos"] = False
        if self.json:
            body["ignore_eos"] = False
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "answer", "schema": ANSWER_SCHEMA, "strict": True},
            }
        return body
