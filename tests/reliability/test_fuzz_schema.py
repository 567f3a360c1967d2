"""schemathesis fuzzes every operation of the OpenAPI schema against a simulated-engine server: no
5xx, and every 4xx is a JSON error. Its own module, so that a missing schemathesis skips only this
(and under CI fails, see tests/conftest.py) rather than the hand-written corpus beside it."""

from __future__ import annotations

import pytest

from tests.reliability.harness import long_mode
from tests.reliability.test_bad_input import PARSER_REFUSAL, _json_error_message

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings

FUZZ_SERVER_ARGS = [
    "--engine",
    "simulated",
    "--mode",
    "batch",
    "--sim-ttft-ms",
    "0",
    "--sim-itl-ms",
    "0",
    "--context-window",
    "256",
    "--max-tokens-limit",
    "64",
    "--max-queue",
    "64",
]


@pytest.fixture(scope="module")
def fuzzed_server():
    from tokenmill.bench.spawn import SpawnedServer

    server = SpawnedServer(FUZZ_SERVER_ARGS)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def api_schema(fuzzed_server):
    return schemathesis.openapi.from_url(f"{fuzzed_server.url}/openapi.json")


fuzz = schemathesis.pytest.from_fixture("api_schema")


@pytest.mark.slow
@fuzz.parametrize()
@settings(max_examples=400 if long_mode() else 15, deadline=None, suppress_health_check=list(HealthCheck))
def test_fuzzed_requests_never_get_a_500(case, fuzzed_server):
    response = case.call(base_url=fuzzed_server.url, timeout=20)
    said = f"{case.method} {case.path} {str(case.query)[:200]} {str(case.body)[:200]}: {response.status_code} {response.text[:300]}"
    if response.status_code >= 400 and response.text != PARSER_REFUSAL:
        assert _json_error_message(response.text), said
    # A request may set its own total `timeout`; a tiny one ends as it should, in a 504 that says so.
    own_deadline = response.status_code == 504 and response.json()["error"]["code"] == "request_timeout"
    assert response.status_code < 500 or own_deadline, said
