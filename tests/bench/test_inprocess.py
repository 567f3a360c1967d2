"""The in-process baselines drive the served engine's own code, and report what it produced."""

from __future__ import annotations

import json
import subprocess
import sys

from tokenmill.config import Settings


def test_a_baseline_runs_in_its_own_process_on_the_settings_the_bench_parsed():
    settings = Settings(engine="simulated", sim_ttft_ms=0, sim_itl_ms=0)
    out = subprocess.run(
        [sys.executable, "-m", "tokenmill.bench.inprocess", "batch", "2", "4", "3", settings.model_dump_json()],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["kind"] == "batch" and result["tokens"] == 4 * 3
