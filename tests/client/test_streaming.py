"""The stream-reading pieces every reader shares: which deadline a wait is under, and SSE lines."""

from __future__ import annotations

import pytest

from tokenmill.client.streaming import DONE, sse_event, wait_for_next

LIMITS = {"first_token": 10.0, "between_tokens": 2.0}


def test_the_first_token_is_due_from_the_start_and_later_ones_from_the_one_before():
    assert wait_for_next(True, 3.0, **LIMITS, total=None) == ("first_token", 7.0)
    assert wait_for_next(False, 30.0, **LIMITS, total=None) == ("between_tokens", 2.0)
    assert wait_for_next(True, 12.0, **LIMITS, total=None) == ("first_token", 0.0)  # already late: at once


def test_the_total_cuts_either_wait_short():
    assert wait_for_next(True, 3.0, **LIMITS, total=5.0) == ("total", 2.0)
    assert wait_for_next(False, 29.5, **LIMITS, total=30.0) == ("total", 0.5)
    assert wait_for_next(False, 20.0, **LIMITS, total=30.0) == ("between_tokens", 2.0)


def test_sse_lines():
    assert sse_event('data: {"a": 1}') == {"a": 1}
    assert sse_event("data:[DONE]") == DONE
    assert sse_event("") is None and sse_event(": keep-alive") is None and sse_event("event: x") is None
    with pytest.raises(ValueError):
        sse_event("data: [1, 2]")
    with pytest.raises(ValueError):
        sse_event("data: {not json")
