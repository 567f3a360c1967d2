"""The docs tell the truth about the code they describe."""

from __future__ import annotations

from pathlib import Path

from tokenmill.config import Settings

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_operations_doc_lists_every_setting_with_its_default():
    text = (DOCS / "operations.md").read_text()
    for name, field in Settings.model_fields.items():
        default = "none" if field.default is None else field.default
        row = f"| `--{name.replace('_', '-')}` | `TOKENMILL_{name.upper()}` | `{default}` |"
        assert row in text, f"docs/operations.md is missing or out of date for {name}"
