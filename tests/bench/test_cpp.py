"""The C++ baselines' plumbing, without building llama.cpp: the batched-bench command and its
output, the comparison table, and a non-tokenmill server started, awaited and stopped."""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

import httpx

from tokenmill.bench import cpp
from tokenmill.bench.spawn import SpawnedServer

JSONL = """main: n_kv_max = 2816, n_batch = 512
{"pl": 1, "speed_tg": 150.5, "speed_pp": 900.0}
{"pl": 8, "speed_tg": 230.25, "speed_pp": 950.0}
"""  # llama.cpp's log lines come with the rows


def test_batched_bench_decode_rates_are_read_per_sequence_count():
    assert cpp.decode_rates(JSONL) == {1: 150.5, 8: 230.25}


def test_batched_bench_runs_every_level_with_the_served_threads_and_room_for_all_sequences():
    command = cpp.batched_bench_command(Path("/opt/b"), Path("/m.gguf"), [1, 8, 32], 48, 64, threads=2)
    assert command[0] == "/opt/b/llama-batched-bench"
    flags = dict(zip(command[1::2], command[2::2], strict=False))
    assert flags["-npl"] == "1,8,32" and flags["-ntg"] == "64" and flags["-npp"] == "48" and flags["-t"] == "2"
    assert int(flags["-c"]) >= 32 * (48 + 64)  # every sequence of the largest level fits at once
    assert flags["--output-format"] == "jsonl"


def test_the_comparison_puts_each_target_over_llama_server_and_the_kernels(monkeypatch):
    monkeypatch.setattr(cpp, "batched_bench", lambda *args: {1: 100.0, 8: 200.0})
    monkeypatch.setattr(cpp, "_served", lambda args: (Path("/m.gguf"), 2))
    rows = [
        {"target": "batch", "concurrency": 1, "output_tokens_per_s": 90.0, "ttft_p50": 0.05},
        {"target": "batch", "concurrency": 8, "output_tokens_per_s": 210.0, "ttft_p50": 0.1},
        {"target": cpp.SERVER_LABEL, "concurrency": 1, "output_tokens_per_s": 120.0, "ttft_p50": 0.04},
        {"target": cpp.SERVER_LABEL, "concurrency": 8, "output_tokens_per_s": 200.0, "ttft_p50": 0.08},
    ]
    args = argparse.Namespace(cpp_baselines=Path("/opt/b"))
    table = cpp.compare(rows, [1, 8], cpp.Workload(max_tokens=64), args)
    lines = table.splitlines()[2:]
    assert lines == [
        "| batch | 1 | 90.0 | 120.0 | 0.75x | 100.0 | 0.90x | 50 | 40 |",
        "| batch | 8 | 210.0 | 200.0 | 1.05x | 200.0 | 1.05x | 100 | 80 |",
    ]


def test_another_program_is_served_on_a_free_port_and_awaited_on_its_own_ready_path(tmp_path):
    script = tmp_path / "fake_server.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys
            from http.server import BaseHTTPRequestHandler, HTTPServer

            class Health(BaseHTTPRequestHandler):
                def do_GET(self):
                    self.send_response(200 if self.path == "/health" else 404)
                    self.end_headers()

                def log_message(self, *args):
                    pass

            port = int(sys.argv[sys.argv.index("--port") + 1])
            assert sys.argv[sys.argv.index("--host") + 1] == "127.0.0.1" and sys.argv[-1] == "--flag"
            HTTPServer(("127.0.0.1", port), Health).serve_forever()
            """
        )
    )
    with SpawnedServer(["--flag"], program=[sys.executable, str(script)], ready_path="/health") as server:
        assert httpx.get(f"{server.url}/health").status_code == 200
        assert server.startup_s is not None
    assert server.process.poll() is not None  # stopped with the block


def test_with_rounds_each_target_is_put_over_the_llama_server_of_its_own_round_and_the_median_given(monkeypatch):
    monkeypatch.setattr(cpp, "batched_bench", lambda *args: {8: 200.0})
    monkeypatch.setattr(cpp, "_served", lambda args: (Path("/m.gguf"), 2))

    def row(target: str, tokens_per_s: float, round_number: int) -> dict:
        return {
            "target": target,
            "concurrency": 8,
            "output_tokens_per_s": tokens_per_s,
            "ttft_p50": 0.1,
            "round": round_number,
        }

    rows = [
        row("batch", 180.0, 1),
        row(cpp.SERVER_LABEL, 200.0, 1),  # 0.90x
        row("batch", 240.0, 2),
        row(cpp.SERVER_LABEL, 200.0, 2),  # 1.20x: a drift of the machine between rounds
        row("batch", 190.0, 3),
        row(cpp.SERVER_LABEL, 190.0, 3),  # 1.00x
    ]
    table = cpp.compare(rows, [8], cpp.Workload(max_tokens=64), argparse.Namespace(cpp_baselines=Path("/opt/b")))
    lines = table.splitlines()
    assert lines[2:5] == [
        "| 1 | batch | 8 | 180.0 | 200.0 | 0.90x | 200.0 | 0.90x | 100 | 100 |",
        "| 2 | batch | 8 | 240.0 | 200.0 | 1.20x | 200.0 | 1.20x | 100 | 100 |",
        "| 3 | batch | 8 | 190.0 | 190.0 | 1.00x | 200.0 | 0.95x | 100 | 100 |",
    ]
    assert lines[-1] == "| batch | 8 | 1.00x (0.90-1.20) | 0.95x (0.90-1.20) |"


def test_with_kernels_measured_each_round_each_ratio_uses_its_own_rounds(monkeypatch):
    def not_again(*args):
        raise AssertionError("the kernels were measured in the rounds: not again at the end")

    monkeypatch.setattr(cpp, "batched_bench", not_again)
    monkeypatch.setattr(cpp, "_served", lambda args: (Path("/m.gguf"), 2))
    rows = [
        {"target": target, "concurrency": 8, "output_tokens_per_s": rate, "ttft_p50": 0.1, "round": n}
        for n, target, rate in [(1, "batch", 180.0), (1, cpp.SERVER_LABEL, 200.0)]
        + [(2, cpp.SERVER_LABEL, 200.0), (2, "batch", 190.0)]
    ]
    kernels = {1: {8: 200.0}, 2: {8: 250.0}}  # the machine ran faster in round 2
    table = cpp.compare(rows, [8], cpp.Workload(max_tokens=64), argparse.Namespace(), kernels)
    assert table.splitlines()[2:4] == [
        "| 1 | batch | 8 | 180.0 | 200.0 | 0.90x | 200.0 | 0.90x | 100 | 100 |",
        "| 2 | batch | 8 | 190.0 | 200.0 | 0.95x | 250.0 | 0.76x | 100 | 100 |",
    ]
