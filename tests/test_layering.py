"""The layers stay apart: a walk over every module's imports (see docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import tokenmill

PACKAGE = Path(tokenmill.__file__).parent
HTTP = ("fastapi", "starlette", "uvicorn", "httpx")


def imports_of(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def modules(sub: str) -> list[Path]:
    return sorted((PACKAGE / sub).rglob("*.py")) if (PACKAGE / sub).is_dir() else [PACKAGE / sub]


def forbidden(paths: list[Path], prefixes: tuple[str, ...]) -> list[str]:
    return [
        f"{p.relative_to(PACKAGE)} imports {name}"
        for p in paths
        for name in imports_of(p)
        if any(name == pre or name.startswith(pre + ".") for pre in prefixes)
    ]


@pytest.mark.parametrize(
    ("layer", "banned"),
    [
        ("engines", (*HTTP, "asyncio", "tokenmill.server", "tokenmill.runners", "tokenmill.protocol")),
        ("runners", (*HTTP, "tokenmill.server", "tokenmill.protocol")),
        ("server", ("tokenmill.engines", "llama_cpp")),
        ("protocol", (*HTTP, "asyncio", "tokenmill.engines", "tokenmill.runners", "tokenmill.server")),
        ("sampling.py", (*HTTP, "asyncio", "tokenmill.engines", "tokenmill.runners", "tokenmill.server")),
        ("generation.py", (*HTTP, "asyncio", "tokenmill.engines", "tokenmill.runners", "tokenmill.server")),
        ("errors.py", (*HTTP, "tokenmill")),
        # the engine core and the engine process's loop do no asyncio and no HTTP: plain blocking code
        ("runners/engine_core.py", (*HTTP, "asyncio", "llama_cpp", "torch")),
        ("runners/engine_worker.py", (*HTTP, "asyncio", "tokenmill.config")),
        ("runners/scheduler.py", (*HTTP, "asyncio", "llama_cpp", "torch")),
        ("cpus.py", (*HTTP, "asyncio", "tokenmill")),
        # the CLI sits on top: it parses flags and hands Settings down; nothing imports it back
        ("bench", ("tokenmill.cli",)),
        ("server", ("tokenmill.cli",)),
        ("deploy", ("tokenmill.cli",)),
        # the client stands alone: usable against any server, importing nothing of tokenmill's server side
        (
            "client",
            (
                "fastapi",
                "starlette",
                "uvicorn",
                "tokenmill.server",
                "tokenmill.runners",
                "tokenmill.engines",
                "tokenmill.config",
                "tokenmill.protocol",
            ),
        ),
    ],
)
def test_layer_imports_only_what_it_may(layer, banned):
    assert forbidden(modules(layer), banned) == []


def test_no_module_grows_past_400_lines():
    too_long = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if len(p.read_text().splitlines()) > 400]
    assert too_long == []
