"""Render the reliability suite's JSON lines (TOKENMILL_RELIABILITY_REPORT) as a markdown table.

TOKENMILL_RELIABILITY_REPORT=/tmp/rel.jsonl python -m pytest tests/reliability [--long]
python -m tests.reliability.report /tmp/rel.jsonl
"""

from __future__ import annotations

import json
import sys

COLUMNS = ["scenario", "mode", "load", "injected", "completed", "refused", "errored", "dropped", "lost"]


def render(lines: list[str]) -> str:
    rows = [json.loads(line) for line in lines if line.strip()]
    extras = sorted({k for r in rows for k in r} - set(COLUMNS) - {"long"})
    header = [*COLUMNS, "other results"]
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        other = ", ".join(f"{k} {r[k]}" for k in extras if k in r)
        out.append("| " + " | ".join(str(r.get(c, "")) for c in COLUMNS) + f" | {other} |")
    return "\n".join(out)


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        print(render(f.readlines()))
