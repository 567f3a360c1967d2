"""Reading an OpenAI-style token stream, written once for every reader in tokenmill: the client,
the load generator, and the server's own deadlines over its engine's events.

    wait_for_next(first, elapsed, first_token=..., between_tokens=..., total=...) -> (phase, seconds)
    sse_event(line) -> the line's JSON object, DONE, or None
"""

from __future__ import annotations

import json
from typing import Literal

Phase = Literal["first_token", "between_tokens", "total"]
DONE: Literal["[DONE]"] = "[DONE]"


def wait_for_next(
    first: bool, elapsed: float, *, first_token: float, between_tokens: float, total: float | None
) -> tuple[Phase, float]:
    """How long to wait for a stream's next token, and which deadline that wait is.

    The first token is due `first_token` seconds after the start (so waiting in a queue counts);
    each later one `between_tokens` after the one before; neither past `total`. `elapsed` is the
    time since the start."""
    phase: Phase = "first_token" if first else "between_tokens"
    limit = first_token - elapsed if first else between_tokens
    if total is not None and total - elapsed < limit:
        phase, limit = "total", total - elapsed
    return phase, max(0.0, limit)


def sse_event(line: str) -> dict | Literal["[DONE]"] | None:
    """One line of a server-sent event stream: its JSON object, DONE, or None for anything else
    (blank separators, comments, event names). Raises ValueError if the data is not a JSON object."""
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if data == DONE:
        return DONE
    value = json.loads(data)
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")  # noqa: TRY004 -- one error for every malformed event
    return value
