"""A short `tokenmill bench` against a spawned simulated server writes sane results."""

from __future__ import annotations

import json

import pytest

from tokenmill.cli import main


def test_short_bench_against_simulated_server(tmp_path, capsys):
    out = tmp_path / "results"
    code = main(
        [
            "bench",
            "--spawn",
            "--modes",
            "async,batch",
            "--concurrency",
            "1,4",
            "--requests",
            "8",
            "--max-tokens",
            "8",
            "--warmup",
            "1",
            "--out",
            str(out),
            "--cost-per-hour",
            "1.0",
            "--serve-args",
            "--engine simulated --sim-ttft-ms 40 --sim-itl-ms 10 --replicas 2",
        ]
    )
    assert code == 0
    rows = json.loads((out / "results.json").read_text())
    assert [(r["target"].split()[0], r["concurrency"]) for r in rows] == [
        ("async", 1),
        ("async", 4),
        ("batch", 1),
        ("batch", 4),
    ]
    for row in rows:
        assert row["ok"] == 8 and row["errors"] == 0 and row["rejected"] == 0
        assert row["output_tokens_per_s"] > 0
    alone = {r["target"].split()[0]: r for r in rows if r["concurrency"] == 1}
    for row in alone.values():
        # unloaded, the measured latencies follow the simulated cost model (40 ms TTFT, 10 ms/token)
        assert 0.035 <= row["ttft_p50"] <= 0.2
        assert 0.008 <= row["itl_p50"] <= 0.05
    # 2 replicas serve at most 2 at once; the batch runner steps all 4 together
    four = {r["target"].split()[0]: r for r in rows if r["concurrency"] == 4}
    assert four["batch"]["output_tokens_per_s"] > four["async"]["output_tokens_per_s"]
    for row in rows:  # $1/h at X tok/s
        assert row["cost_per_million_tokens"] == pytest.approx(1.0 / (row["output_tokens_per_s"] * 3600) * 1e6)
    assert (out / "results.csv").exists() and "| async" in (out / "results.md").read_text()
    for plot in ("throughput.png", "ttft_p99.png", "latency_cdf.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    latencies = json.loads((out / "requests.json").read_text())
    assert len(latencies) == 4 and all(len(v) == 8 for v in latencies.values())
    assert "tok/s" in capsys.readouterr().out


def test_rounds_measure_each_level_on_every_target_back_to_back_in_turned_order(tmp_path):
    out = tmp_path / "results"
    serve = "--engine simulated --sim-ttft-ms 20 --sim-itl-ms 5"
    argv = ["bench", "--spawn", "--modes", "async,batch", "--concurrency", "1,2", "--requests", "4"]
    code = main([*argv, "--max-tokens", "4", "--rounds", "2", "--out", str(out), "--serve-args", serve])
    assert code == 0
    rows = json.loads((out / "results.json").read_text())
    # a level on both targets seconds apart, and neither always first: a drift of the machine falls
    # on both alike
    assert [(r["round"], r["concurrency"], r["target"].split()[0]) for r in rows] == [
        (1, 1, "async"),
        (1, 1, "batch"),
        (1, 2, "async"),
        (1, 2, "batch"),
        (2, 1, "batch"),
        (2, 1, "async"),
        (2, 2, "batch"),
        (2, 2, "async"),
    ]
    # fresh servers each round, both up through it: one start per target and round
    starts = {(r["round"], r["target"]): r["startup_s"] for r in rows}
    assert len({(r["round"], r["target"], r["startup_s"]) for r in rows}) == len(starts) == 4
    assert len(set(starts.values())) == 4
    assert all(r["ok"] == 4 for r in rows)
    assert "| round |" in (out / "results.md").read_text()
    latencies = json.loads((out / "requests.json").read_text())
    assert sorted(len(v) for v in latencies.values()) == [8, 8, 8, 8]  # both rounds' requests per target and level


def test_open_loop_sends_poisson_arrivals_at_the_offered_rate(tmp_path):
    out = tmp_path / "open"
    code = main(
        [
            "bench",
            "--spawn",
            "--modes",
            "batch",
            "--rate",
            "40",
            "--duration",
            "1.5",
            "--max-tokens",
            "4:8",
            "--out",
            str(out),
            "--serve-args",
            "--engine simulated --sim-ttft-ms 5 --sim-itl-ms 5 --max-batch 64",
        ]
    )
    assert code == 0
    (row,) = json.loads((out / "results.json").read_text())
    assert row["rate"] == 40 and row["errors"] == 0
    assert 30 <= row["requests"] <= 95  # ~60 expected in 1.5 s at 40/s
    assert (out / "throughput.png").exists()
