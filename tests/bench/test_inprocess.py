"""The in-process baselines drive the served engine's own code, and report what it produced."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tokenmill.bench.inprocess import engine_step_loop
from tokenmill.bench.workload import Workload
from tokenmill.config import Settings


@pytest.mark.parametrize("engine", ["simulated", "llamacpp"])
def test_engine_step_loop_runs_every_sequence_to_max_tokens(engine):
    settings = Settings(engine=engine, mode="batch", max_batch=3, sim_ttft_ms=0, sim_itl_ms=0, threads=1)
    measured = engine_step_loop(settings, Workload(max_tokens=5), concurrency=3, requests=4)  # waves of 3 and 1
    assert measured.tokens == 4 * 5
    assert measured.concurrency == 3 and measured.seconds > 0
    assert engine in measured.name


def test_a_baseline_runs_in_its_own_process_on_the_settings_the_bench_parsed():
    settings = Settings(engine="simulated", sim_ttft_ms=0, sim_itl_ms=0)
    out = subprocess.run(
        [sys.executable, "-m", "tokenmill.bench.inprocess", "bare", "2", "4", "3", settings.model_dump_json()],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["kind"] == "bare" and result["tokens"] == 4 * 3
    assert result["name"].startswith("simulated engine step loop")
