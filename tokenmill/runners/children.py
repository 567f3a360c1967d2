"""How the engine and worker processes are started: from a fork server, not spawned afresh.

A spawned child starts a new interpreter and imports the engine's modules before it can load a
model: a second or so of a core, at every start, every restart after a crash, every runner a test
builds. A fork server is one such process, started on first use with those modules imported; each
child is forked from it, a copy made in milliseconds. It is a fresh process as spawn's are (the
fork server never runs a thread, an event loop or a model): nothing of the parent's state comes
along. The environment a child sees is the fork server's, taken when it started.
"""

from __future__ import annotations

import multiprocessing
from multiprocessing.context import BaseContext

# what the children run (engine_main, worker_main), and the parent's main module (each child would
# import it again otherwise, as a spawned one does): imported once, in the fork server
PRELOADED = ["__main__", "tokenmill.runners.engine_worker", "tokenmill.runners.process_worker"]


def child_processes() -> BaseContext:
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOADED)
    return context
