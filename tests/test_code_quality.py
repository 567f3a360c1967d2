"""ruff (lint and format) and mypy keep the code honest; they run with the rest of the suite, so
the README's one test command (and CI) checks them too. Configuration: pyproject.toml."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "command",
    [
        pytest.param(["ruff", "check", "tokenmill", "tests"], id="ruff-check"),
        pytest.param(["ruff", "format", "--check", "tokenmill", "tests"], id="ruff-format"),
        pytest.param(["mypy", "tokenmill"], id="mypy"),
    ],
)
def test_the_code_passes(command):
    done = subprocess.run([sys.executable, "-m", *command], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(command)}:\n{done.stdout[-4000:]}{done.stderr[-2000:]}"
