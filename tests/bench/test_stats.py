"""Bench statistics on synthetic records: percentiles, throughput, goodput, steady-state TTFT."""

from __future__ import annotations

import itertools
import math

import pytest

from tokenmill.bench.stats import RequestRecord, percentile, summarize


def test_percentile_matches_linear_interpolation():
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 90) == pytest.approx(90.1)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile([3.0], 99) == 3.0
    assert math.isnan(percentile([], 50))


def test_percentile_ignores_input_order():
    assert percentile([5.0, 1.0, 3.0], 50) == 3.0


def ok(started, ttft, gaps, tokens):
    return RequestRecord(
        started=started, status="ok", ttft=ttft, gaps=gaps, latency=ttft + sum(gaps), output_tokens=tokens
    )


def test_summary_counts_throughput_and_statuses():
    records = [
        ok(0.0, 0.1, [0.01] * 9, 10),
        ok(0.0, 0.3, [0.02] * 9, 10),
        RequestRecord(started=0.0, status="rejected"),
        RequestRecord(started=0.0, status="error", error="boom"),
    ]
    s = summarize(records, duration_s=2.0)
    assert (s.requests, s.ok, s.rejected, s.errors) == (4, 2, 1, 1)
    assert s.output_tokens_per_s == pytest.approx(10.0)
    assert s.request_throughput == pytest.approx(1.0)
    assert s.ttft_p50 == pytest.approx(0.2)
    assert s.itl_p50 == pytest.approx(0.015)


def test_goodput_counts_only_requests_within_the_slo():
    records = [ok(0.0, 0.1, [0.01] * 4, 5), ok(0.0, 0.5, [0.01] * 4, 5), ok(0.0, 0.1, [0.2] * 4, 5)]
    s = summarize(records, duration_s=1.0, slo_ttft=0.2, slo_itl=0.05)
    assert s.goodput == pytest.approx(1.0)
    assert summarize(records, duration_s=1.0).goodput == pytest.approx(3.0)


def test_steady_state_ttft_excludes_the_first_wave():
    first_wave = [ok(0.0, 2.0, [0.1] * 5, 6) for _ in range(3)]  # slow: all arrived at once
    later = [ok(3.0, 0.2, [0.1] * 5, 6), ok(3.5, 0.4, [0.1] * 5, 6)]  # sent after the first finished (t=2.5)
    s = summarize(first_wave + later, duration_s=5.0)
    assert s.ttft_p99 == pytest.approx(2.0)
    assert s.steady_ttft_p50 == pytest.approx(0.3)


def test_loop_lag_p99_from_prometheus_bucket_differences():
    from tokenmill.bench.lag import lag_p99

    before = {0.001: 100.0, 0.01: 100.0, 0.1: 100.0, math.inf: 100.0}
    after = {0.001: 150.0, 0.01: 198.0, 0.1: 200.0, math.inf: 200.0}  # 100 new ticks: 50 < 1 ms, 48 < 10 ms, 2 < 100 ms
    assert lag_p99(before, after) == 0.1
    assert lag_p99(before, {0.001: 199.0, 0.01: 200.0, 0.1: 200.0, math.inf: 200.0}) == 0.001  # 99 of 100 within 1 ms
    assert lag_p99(before, {0.001: 198.0, 0.01: 200.0, 0.1: 200.0, math.inf: 200.0}) == 0.01
    assert lag_p99(None, after) is None


def test_steady_throughput_counts_tokens_between_the_first_completion_and_the_last_send():
    # tokens at 0.75, 1.0, 1.25 (the first completion) / 1.0, 1.25 ... 3.25 / 3.25, 3.5 (sent at 3.0, the last)
    records = [ok(0.5, 0.25, [0.25] * 2, 3), ok(0.75, 0.25, [0.25] * 9, 10), ok(3.0, 0.25, [0.25], 2)]
    s = summarize(records, duration_s=4.0)
    # in [1.25, 3.0): the first one's last token and the second one's 1.25 ... 2.75
    assert s.steady_output_tokens_per_s == pytest.approx((1 + 7) / 1.75)
    assert math.isnan(summarize([ok(0.0, 0.1, [], 1)], duration_s=1.0).steady_output_tokens_per_s)


async def test_ramp_up_starts_the_clients_evenly(monkeypatch):
    import asyncio
    import time

    from tokenmill.bench import loadgen
    from tokenmill.bench.workload import Workload

    first_sends: dict[int, float] = {}

    async def fake_stream_one(client, body, run_started):
        first_sends.setdefault(len(first_sends), time.perf_counter() - run_started)
        await asyncio.sleep(0.5)
        return ok(0.0, 0.01, [], 1)

    monkeypatch.setattr(loadgen, "stream_one", fake_stream_one)
    records, _ = await loadgen.closed_loop("http://127.0.0.1:9", "m", Workload.from_spec("4"), 4, 4, ramp_up=0.4)
    assert len(records) == 4
    starts = [first_sends[i] for i in range(4)]
    assert starts[0] < 0.05 and all(0.07 <= b - a <= 0.2 for a, b in itertools.pairwise(starts))


def test_the_json_workload_asks_for_the_schema_and_lets_the_grammar_end_the_answer():
    from tokenmill.bench.workload import ANSWER_SCHEMA, Workload

    plain, constrained = Workload().request_body(3, "m"), Workload(json=True).request_body(3, "m")
    assert "response_format" not in plain and plain["ignore_eos"] is True
    assert constrained["response_format"]["json_schema"]["schema"] == ANSWER_SCHEMA
    assert constrained["ignore_eos"] is False
    assert {k: v for k, v in constrained.items() if k not in ("response_format", "ignore_eos")} == {
        k: v for k, v in plain.items() if k != "ignore_eos"
    }  # otherwise the same requests: the comparison is of the constraint alone


async def test_a_refused_closed_loop_client_waits_before_its_next_request(monkeypatch):
    """A 503 with Retry-After 0.3 s: the client's next request comes no sooner, and the wait
    never runs past the run's end (a 1 s run, each refusal asking for 0.3 s: 3-4 requests, not
    hundreds)."""
    import time

    from tokenmill.bench import loadgen
    from tokenmill.bench.workload import Workload

    sends: list[float] = []
    retry_after = 0.3

    async def refused(client, body, run_started):
        sends.append(time.perf_counter() - run_started)
        record = RequestRecord(started=sends[-1], status="rejected", http_status=503)
        record.retry_after = retry_after
        return record

    monkeypatch.setattr(loadgen, "stream_one", refused)
    records, _ = await loadgen.closed_loop("http://127.0.0.1:9", "m", Workload.from_spec("4"), 1, None, duration=1.0)
    assert 3 <= len(records) <= 4
    assert all(b - a >= 0.29 for a, b in itertools.pairwise(sends))
    retry_after, started = 20.0, time.perf_counter()  # longer than the run: the run still ends on time
    records, _ = await loadgen.closed_loop("http://127.0.0.1:9", "m", Workload.from_spec("4"), 1, None, duration=0.5)
    assert len(records) == 1 and time.perf_counter() - started < 1.5
