"""Flags and TOKENMILL_* environment variables map onto Settings; --help tells the truth."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tokenmill.cli import build_parser, main, settings_from_args
from tokenmill.config import Settings


def settings(argv: list[str]) -> Settings:
    return settings_from_args(build_parser().parse_args(["serve", *argv]))


def test_defaults():
    s = settings([])
    assert (s.host, s.port, s.engine, s.mode, s.replicas) == ("127.0.0.1", 8000, "llamacpp", "batch", 1)
    assert (s.capacity(), s.queue_limit()) == (32, 64)  # a newcomer's concurrent requests are batched
    upstream = settings(["--engine", "upstream", "--upstream-url", "http://127.0.0.1:9"])
    assert upstream.mode == "async"  # relaying is network I/O: the event loop's default


def test_every_setting_has_a_flag():
    help_text = build_parser()._subparsers._group_actions[0].choices["serve"].format_help()
    for name in Settings.model_fields:
        assert "--" + name.replace("_", "-") in help_text
        assert f"TOKENMILL_{name.upper()}" in help_text.replace("\n", "").replace(" ", "")


def test_environment_sets_and_flag_overrides(monkeypatch):
    monkeypatch.setenv("TOKENMILL_PORT", "9001")
    monkeypatch.setenv("TOKENMILL_ENGINE", "simulated")
    monkeypatch.setenv("TOKENMILL_SIM_ITL_MS", "3.5")
    s = settings(["--port", "9002"])
    assert (s.port, s.engine, s.sim_itl_ms) == (9002, "simulated", 3.5)


def test_invalid_value_exits_2_with_a_message(capsys):
    assert main(["serve", "--port", "99999"]) == 2
    assert "port" in capsys.readouterr().err


def test_unknown_choice_is_refused_by_the_parser():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--mode", "turbo"])


def test_python_dash_m_entry_point_works():
    result = subprocess.run([sys.executable, "-m", "tokenmill", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and "tokenmill" in result.stdout


def test_optional_engines_without_their_extra_are_refused_clearly(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name in ("torch", "ray") else real(name, *a)
    )
    assert main(["serve", "--engine", "torch"]) == 2
    assert main(["ray-serve"]) == 2
    said = capsys.readouterr().err
    assert "pip install 'tokenmill[torch]'" in said and "pip install 'tokenmill[ray]'" in said


@pytest.mark.parametrize(
    ("model", "said"),
    [("/nonexistent.gguf", "model file not found: /nonexistent.gguf"), ("/etc/passwd", "is not a GGUF model file")],
)
def test_a_bad_model_path_is_one_clear_line_and_exit_2(tmp_path, model, said):
    # Before: a 20-line traceback for a missing file, another for a file that is not a model.
    result = subprocess.run(
        [sys.executable, "-m", "tokenmill", "serve", "--model", model, "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tokenmill: ") and said in lines[0]


def test_a_fractional_keep_alive_timeout_reaches_uvicorn_as_given():
    from tokenmill.cli import uvicorn_config

    settings = settings_from_args(
        build_parser().parse_args(["serve", "--keep-alive-timeout", "0.5", "--engine", "simulated"])
    )
    assert uvicorn_config(settings, app=None).timeout_keep_alive == 0.5  # was cut to int: 0, closing at once
