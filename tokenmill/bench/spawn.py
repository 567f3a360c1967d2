"""Start a `tokenmill serve` process on a free loopback port, wait until it answers, stop it.

Used by `tokenmill bench --spawn` and by the end-to-end tests. The server's output goes to a
temporary file, never to an unread pipe (a busy server would fill the pipe and block on it).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


class SpawnedServer:
    def __init__(self, serve_args: list[str], ready_timeout: float = 180.0, log_level: str = "warning"):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = tempfile.TemporaryFile()
        cmd = [sys.executable, "-m", "tokenmill", "serve", "--host", "127.0.0.1", "--port", str(self.port),
               "--log-level", log_level, *serve_args]
        started = time.monotonic()
        self.process = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT)
        self.startup_s: float | None = None  # from launch to /ready: imports, model load, warm-up
        deadline = started + ready_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited during start-up:\n{self.output()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=1).status_code == 200:
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
        try:
            for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            return None
        return None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()

    def __enter__(self) -> SpawnedServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
