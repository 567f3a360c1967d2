"""`tokenmill bench --conversations`: seeded multi-turn traffic, reported per turn."""

from __future__ import annotations

import json

from tokenmill.bench.conversations import Conversations, TurnRecord, per_turn_rows, shared_system_prompt
from tokenmill.cli import main


def test_the_same_spec_sends_the_same_messages():
    spec = Conversations.from_spec("4x3", shared_prefix=True)
    assert (spec.count, spec.turns) == (4, 3)
    again = Conversations.from_spec("4x3", shared_prefix=True)
    assert [spec.opening(i) for i in range(4)] == [again.opening(i) for i in range(4)]
    assert spec.opening(0)[0]["content"] == spec.opening(3)[0]["content"] == shared_system_prompt()
    assert len({spec.opening(i)[1]["content"] for i in range(4)}) > 1  # conversations differ after the prefix


def test_rows_per_turn_count_hits_and_errors():
    records = [
        TurnRecord(0, 0, ttft=0.5, output_tokens=4, prompt_tokens=100, cached_tokens=0),
        TurnRecord(1, 0, ttft=0.7, output_tokens=4, prompt_tokens=100, cached_tokens=50),
        TurnRecord(0, 1, ttft=0.1, output_tokens=4, prompt_tokens=200, cached_tokens=150),
        TurnRecord(1, 1, error="HTTP 503"),
    ]
    first, second, total = per_turn_rows("x", records, seconds=2.0)
    assert (first["turn"], first["ok"], first["errors"], first["cache_hit_rate"]) == ("1", 2, 0, 0.25)
    assert (second["turn"], second["ok"], second["errors"], second["cache_hit_rate"]) == ("2", 1, 1, 0.75)
    assert total["turn"] == "all" and total["output_tok_s"] == 6.0 and total["errors"] == 1


def test_a_short_run_against_a_simulated_server(tmp_path):
    out = tmp_path / "conv"
    code = main(
        [
            "bench",
            "--spawn",
            "--modes",
            "batch",
            "--serve-args",
            "--engine simulated --sim-ttft-ms 20 --sim-itl-ms 5",
            "--conversations",
            "3x2",
            "--max-tokens",
            "4",
            "--think-time",
            "0.05",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    rows = json.loads((out / "conversations.json").read_text())
    assert [r["turn"] for r in rows] == ["1", "2", "all"]
    assert all(r["errors"] == 0 for r in rows) and rows[-1]["ok"] == 6
    assert rows[1]["prompt_tokens_mean"] > rows[0]["prompt_tokens_mean"]  # turn 2 resends turn 1
    assert "| batch" in (out / "conversations.md").read_text()
