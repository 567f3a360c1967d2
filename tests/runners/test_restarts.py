"""When an engine is restarted, how long after, and when a crash loop means giving up."""

from __future__ import annotations

from tokenmill.runners.restarts import RestartPolicy, exit_reason


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_backoff_doubles_up_to_the_cap_then_a_crash_loop_gives_up():
    clock = Clock()
    policy = RestartPolicy(limit=5, window=60, first_delay=0.1, max_delay=1.0, clock=clock)
    delays = []
    for _ in range(5):
        delays.append(policy.next_delay())
        clock.now += 2
    assert delays == [0.1, 0.2, 0.4, 0.8, 1.0]
    assert policy.next_delay() is None  # the sixth failure within 60 s


def test_failures_spread_wider_than_the_window_never_give_up_and_backoff_resets():
    clock = Clock()
    policy = RestartPolicy(limit=2, window=10, first_delay=0.5, clock=clock)
    for _ in range(20):
        assert policy.next_delay() == 0.5
        clock.now += 11


def test_exit_reasons_name_the_signal():
    assert exit_reason(-11) == "SIGSEGV"
    assert exit_reason(-9) == "SIGKILL"
    assert exit_reason(1) == "exit_1"
    assert exit_reason(-200) == "signal_200"
