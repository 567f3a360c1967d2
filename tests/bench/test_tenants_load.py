"""`tokenmill bench --tenants`: the spec, the key file it writes, per-tenant rows, and a short run
against a spawned simulated server with a quota."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest

from tokenmill.bench.loadgen import served_model
from tokenmill.bench.spawn import SpawnedServer
from tokenmill.bench.stats import RequestRecord
from tokenmill.bench.tenants import TenantLoad, alone_ratios, parse_tenants, tenant_rows, warm_up, write_key_file
from tokenmill.bench.workload import PROMPTS, Workload
from tokenmill.cli import main
from tokenmill.tenants import parse_keys


def test_the_spec_names_each_tenants_load_and_key_file_fields(tmp_path):
    loads = parse_tenants("flood:rate=60, steady:concurrency=2:weight=3:tokens_per_minute=600")
    assert loads[0] == TenantLoad("flood", rate=60.0)
    assert loads[1].concurrency == 2 and loads[1].key_file_fields == (("weight", "3"), ("tokens_per_minute", "600"))
    tenants = parse_keys(write_key_file(loads, tmp_path / "keys").read_text().splitlines())
    steady = tenants["bench-steady"]  # the key file the server reads back
    assert (steady.label, steady.weight, steady.tokens_per_minute) == ("steady", 3.0, 600)


@pytest.mark.parametrize("spec", ["a", "a:rate=1:concurrency=2", "a:speed=3", "a:rate"])
def test_a_bad_spec_is_refused(spec):
    with pytest.raises(ValueError, match="--tenants"):
        parse_tenants(spec)


def test_rows_count_refusals_apart_and_tokens_within_the_window():
    def done(start: float, latency: float, tokens: int) -> RequestRecord:
        return RequestRecord(start, "ok", ttft=0.1, latency=latency, output_tokens=tokens, http_status=200)

    records = {
        "a": [done(0, 1, 30), done(9, 2, 30), RequestRecord(1, "rejected", http_status=503, retry_after=4.0)],
        "b": [done(0, 1, 10), RequestRecord(2, "rejected", http_status=429, retry_after=2.0), RequestRecord(3)],
    }
    a, b = tenant_rows("x", "together", records, window=10.0)
    assert (a["ok"], a["refused_503"], a["refused_429"], a["lost"], a["retry_after_p50_s"]) == (2, 1, 0, 0, 4.0)
    assert (b["refused_429"], b["lost"]) == (1, 1)  # the third: neither answered nor refused
    assert a["output_tok_s"] == 3.0  # the request that ended after the window is not counted
    assert a["token_share"] == 0.75 and b["token_share"] == 0.25


def bench_tenants(out: Path, tenants: str, alone: str, *extra: str) -> int:
    """`tokenmill bench --tenants` against a spawned simulated server, short phases."""
    sim = "--engine simulated --sim-ttft-ms 5 --sim-itl-ms 5"
    args = ["--tenants", tenants, "--tenants-alone", alone, "--max-tokens", "8", "--out", str(out), *extra]
    return main(["bench", "--spawn", "--modes", "batch", *args, "--serve-args", sim])


def test_a_short_multi_tenant_run_against_a_simulated_server(tmp_path):
    out = tmp_path / "results"
    code = bench_tenants(out, "metered:rate=8:tokens_per_minute=60,free:concurrency=2", "free", "--duration", "2")
    assert code == 0
    rows = {(r["phase"], r["tenant"]): r for r in json.loads((out / "tenants.json").read_text())}
    assert set(rows) == {("alone", "free"), ("together", "metered"), ("together", "free")}
    metered, free = rows["together", "metered"], rows["together", "free"]
    assert metered["refused_429"] > 0 and metered["ok"] > 0  # over its quota, after its first minute's worth
    assert free["refused_429"] == free["refused_503"] == 0 and free["ok"] > 0
    assert all(row["lost"] == 0 for row in rows.values())


def test_rounds_repeat_every_phase_on_one_server_and_give_each_rounds_ratio(tmp_path):
    out = tmp_path / "results"
    code = bench_tenants(out, "busy:concurrency=4,quiet:rate=4", "quiet", "--duration", "1", "--rounds", "2")
    assert code == 0
    rows = json.loads((out / "tenants.json").read_text())
    assert [(r["round"], r["phase"], r["tenant"]) for r in rows] == [
        (n, phase, tenant)
        for n in (1, 2)
        for phase, tenant in (("alone", "quiet"), ("together", "busy"), ("together", "quiet"))
    ]
    requests = json.loads((out / "tenants-requests.json").read_text())
    for r in rows:  # every request of every phase is written, and counted in its row
        mine = [q for q in requests if (q["round"], q["phase"], q["tenant"]) == (r["round"], r["phase"], r["tenant"])]
        assert len(mine) == r["sent"] and sum(q["status"] == "ok" for q in mine) == r["ok"]
    summary = (out / "tenants.md").read_text()
    assert "median" in summary and summary.count(" | 1 | quiet | ") == 1
    # quiet sends the same requests at the same moments alone and beside busy: one load, compared
    for n in (1, 2):
        alone, together = (
            [q["started_s"] for q in requests if (q["round"], q["phase"], q["tenant"]) == (n, phase, "quiet")]
            for phase in ("alone", "together")
        )
        assert abs(len(alone) - len(together)) <= 1 and len(alone) >= 2
        assert all(abs(a - b) < 0.1 for a, b in zip(alone, together, strict=False))


def test_alone_ratios_pair_each_round_with_its_own_alone_phase():
    def row(phase: str, tenant: str, p99: float, round_number: int) -> dict:
        return {
            "target": "t",
            "phase": phase,
            "tenant": tenant,
            "ttft_p50_ms": 10.0,
            "ttft_p99_ms": p99,
            "round": round_number,
        }

    rows = [row("alone", "s", 100, 1), row("together", "s", 150, 1), row("together", "f", 900, 1)]
    rows += [
        row("alone", "s", 50, 2),
        row("together", "s", 200, 2),
        row("alone", "s", 100, 3),
        row("together", "s", 120, 3),
    ]
    summary = alone_ratios(rows)
    assert "| t | 1 | s | 1.00x | 1.50x |" in summary and "| t | 2 | s | 1.00x | 4.00x |" in summary
    assert "median 1.50x over 3 round(s) (1.20-4.00x)" in summary and "| f |" not in summary
    assert alone_ratios([row("together", "s", 150, 1)]) == ""


def test_the_warm_up_sends_each_prompt_once_with_a_key_that_has_no_quota(tmp_path):
    loads = parse_tenants("metered:rate=1:tokens_per_minute=60,free:rate=1")
    keys = write_key_file(loads, tmp_path / "keys")
    server = SpawnedServer(["--engine", "simulated", "--mode", "batch", "--api-key-file", str(keys)])
    try:
        headers = {"Authorization": "Bearer bench-free"}
        model = asyncio.run(served_model(server.url, headers))
        asyncio.run(warm_up(server.url, model, Workload(max_tokens=8), loads))
        metrics = httpx.get(f"{server.url}/metrics", headers=headers, timeout=10).text
    finally:
        server.stop()
    assert f'tokenmill_tenant_admitted_total{{tenant="free"}} {float(len(PROMPTS))}' in metrics
    assert 'tenant="metered"' not in metrics.split("tokenmill_tenant_admitted_total")[1].split("# HELP")[0]
    generated = f'tokenmill_tenant_tokens_total{{kind="generated",tenant="free"}} {float(len(PROMPTS))}'
    assert generated in metrics  # one token each
