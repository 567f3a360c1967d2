"""The garbage collector's view of a serving process: what lives from start-up is frozen out of
it (tokenmill.heap), in `tokenmill serve`'s server and engine processes, and only there."""

from __future__ import annotations

import gc
import logging
import re
from collections.abc import Iterator

import pytest

from tests.conftest import sim_settings
from tokenmill.heap import freeze_long_lived
from tokenmill.server import create_app


@pytest.fixture
def unfrozen() -> Iterator[None]:
    """The test process must not keep what a test froze: frozen objects are never collected."""
    gc.unfreeze()
    yield
    gc.unfreeze()


def test_freezing_hides_what_is_alive_and_first_collects_what_is_not(unfrozen):
    class Node:
        def __init__(self) -> None:
            self.me = self  # a cycle: only the collector frees it

    kept = Node()
    Node()  # garbage, in a cycle
    garbage_before = sum(type(o) is Node for o in gc.get_objects())
    frozen = freeze_long_lived()
    assert garbage_before == 2 and frozen == gc.get_freeze_count() > 1000
    assert not any(type(o) is Node for o in gc.get_objects())  # the live one is out of sight
    gc.unfreeze()
    assert [o for o in gc.get_objects() if type(o) is Node] == [kept]  # the garbage was collected first


@pytest.mark.parametrize("freeze", [True, False])
async def test_an_app_freezes_its_heap_once_started_only_when_asked(unfrozen, freeze):
    app = create_app(sim_settings(), freeze_heap=freeze)
    assert gc.get_freeze_count() == 0
    async with app.router.lifespan_context(app):
        assert (gc.get_freeze_count() > 1000) == freeze


@pytest.mark.parametrize("flag", ["--gc-freeze", "--no-gc-freeze"])
def test_serve_freezes_the_server_and_the_engine_process_unless_told_not_to(serve_process, flag):
    server = serve_process("--engine", "simulated", "--mode", "batch", flag)
    froze = [line for line in server.output().splitlines() if "long-lived objects" in line]
    if flag == "--no-gc-freeze":
        assert froze == []
    else:  # one line from the server process, one from the engine's ("[engine PID]")
        assert len(froze) == 2 and sum("[engine " in line for line in froze) == 1, froze


@pytest.mark.parametrize("freeze", [True, False])
async def test_process_mode_workers_freeze_their_heaps_unless_told_not_to(caplog, freeze):
    """`process` mode's workers serve until they exit too; each reports what it froze in its Ready."""
    from tokenmill.runners.processes import ProcessRunner

    runner = ProcessRunner(sim_settings(mode="process", replicas=2, gc_freeze=freeze), "sim")
    with caplog.at_level(logging.INFO, logger="tokenmill.runners.processes"):
        await runner.start()
        await runner.stop()
    counts = [int(m.group(1)) for r in caplog.records if (m := re.search(r"froze (\d+) long-lived", r.getMessage()))]
    assert (len(counts), all(count > 1000 for count in counts)) == ((2, True) if freeze else (0, True))
