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


def test_the_ratios_find_the_http_rows_of_the_baselines_engine_however_the_modes_were_named():
    from tokenmill.bench.baselines import ratio_table

    def row(target: str, level: int, tokens_per_s: float) -> dict:
        return {"target": target, "concurrency": level, "output_tokens_per_s": tokens_per_s}

    baselines = {"batch@8": {"tokens_per_s": 200.0}, "llama": {"tokens_per_s": 100.0}}
    named = [row("torch:batch", 8, 500.0), row("llamacpp:batch --kv-streams", 8, 190.0)]
    assert ratio_table(named, baselines, "llamacpp").splitlines()[2:] == [
        "| HTTP batch @8 | 190.0 | in-process batch runner @8 | 200.0 | 0.95x |"
    ]
    bare = [row("async", 8, 100.0), row("batch", 8, 180.0), row("batch", 1, 90.0)]
    assert ratio_table(bare, baselines | {"batch@1": {"tokens_per_s": 100.0}}, "llamacpp").splitlines()[2:] == [
        "| HTTP batch @8 | 180.0 | HTTP async @8 | 100.0 | 1.80x |",
        "| HTTP batch @1 | 90.0 | in-process batch runner @1 | 100.0 | 0.90x |",
        "| HTTP batch @8 | 180.0 | in-process batch runner @8 | 200.0 | 0.90x |",
        "| HTTP batch @1 | 90.0 | llama_cpp.Llama loop @1 | 100.0 | 0.90x |",
    ]
