"""When to restart a failed engine or worker, and when to stop trying. Pure bookkeeping, no I/O.

Backoff doubles from `first_delay` up to `max_delay` while failures come close together. More than
`limit` restarts within `window` seconds is a crash loop: restarting again would only hide it, so
the owner gives up and the server exits non-zero for its orchestrator to replace it.
"""

from __future__ import annotations

import signal
import time
from collections import deque
from collections.abc import Callable


class RestartPolicy:
    def __init__(
        self,
        limit: int = 5,
        window: float = 60.0,
        first_delay: float = 0.1,
        max_delay: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.limit = limit
        self.window = window
        self.first_delay = first_delay
        self.max_delay = max_delay
        self._clock = clock
        self._recent: deque[float] = deque()

    def next_delay(self) -> float | None:
        """Record one failure; seconds to wait before restarting, or None when it is a crash loop."""
        now = self._clock()
        while self._recent and now - self._recent[0] > self.window:
            self._recent.popleft()
        if len(self._recent) >= self.limit:
            return None
        self._recent.append(now)
        return min(self.max_delay, self.first_delay * 2 ** (len(self._recent) - 1))

    @property
    def recent_restarts(self) -> int:
        return len(self._recent)


def exit_reason(exitcode: int | None) -> str:
    """A process's end as a short label: the signal's name (SIGSEGV, SIGKILL...) or exit_N."""
    if exitcode is not None and exitcode < 0:
        try:
            return signal.Signals(-exitcode).name
        except ValueError:
            return f"signal_{-exitcode}"
    return f"exit_{exitcode}"
