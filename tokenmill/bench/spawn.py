"""Start a `tokenmill serve` process on a free loopback port, wait until it answers, stop it.

Used by `tokenmill bench --spawn` and by the end-to-end tests. The server's output goes to a
temporary file, never to an unread pipe (a busy server would fill the pipe and block on it).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Self

import httpx


class SpawnedServer:
    def __init__(
        self,
        serve_args: list[str],
        ready_timeout: float = 180.0,
        log_level: str = "warning",
        cpus: set[int] | None = None,
        program: list[str] | None = None,
        ready_path: str = "/ready",
    ):
        """`program`: another server to start instead of tokenmill (taking --host and --port, and
        `serve_args`; a C++ baseline), ready when `ready_path` answers 200."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 -- lives as long as the server; closed in stop()
        tokenmill = [sys.executable, "-m", "tokenmill", "serve", "--log-level", log_level]
        cmd = [*(program or tokenmill), "--host", "127.0.0.1", "--port", str(self.port), *serve_args]
        started = time.monotonic()
        # `cpus`: the server's affinity mask (as `taskset -c` would set it), e.g. to model a container
        # given fewer CPUs than the machine has.
        pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
        # the child only makes one system call before exec, so preexec_fn is safe here even with threads
        self.process = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, preexec_fn=pin)  # noqa: PLW1509
        self.startup_s: float | None = None  # from launch to /ready: imports, model load, warm-up
        deadline = started + ready_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited during start-up:\n{self.output()[-3000:]}")
            try:
                if httpx.get(f"{self.url}{ready_path}", timeout=1).status_code == 200:
                    self.startup_s = time.monotonic() - started
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server not ready after {ready_timeout}s:\n{self.output()[-3000:]}")

    def output(self) -> str:
        self._log.seek(0)
        return self._log.read().decode("utf-8", "replace")

    def peak_rss_mb(self) -> float | None:
        """Peak resident memory of the server and its engine or worker processes, added up."""
        peaks = [_peak_rss_kb(pid) for pid in [self.process.pid, *child_pids(self.process.pid)]]
        known = [kb for kb in peaks if kb is not None]
        return sum(known) / 1024 if known else None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def child_pids(pid: int) -> list[int]:
    """The direct children of `pid` (engine and worker processes), from /proc."""
    children: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            children += [int(c) for c in (task / "children").read_text().split()]
    except OSError:
        pass
    return children


def worker_pids(pid: int) -> list[int]:
    """The server's engine or worker processes: its children but multiprocessing's resource tracker."""
    workers = []
    for child in child_pids(pid):
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        if b"resource_tracker" not in cmdline:
            workers.append(child)
    return workers


def _peak_rss_kb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None
