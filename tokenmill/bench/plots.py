"""PNG plots of a bench run: one line per target (serving mode and flags), all on one chart each.

A target measured several times in one run (variants alternated to even out drift) is drawn as
the mean of its runs at each level."""

from __future__ import annotations

import math
from pathlib import Path


def plot_all(rows: list[dict], latencies: dict[str, list[float]], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    level_key = "rate" if "rate" in rows[0] else "concurrency"
    level_title = "offered load (requests/s)" if level_key == "rate" else "concurrency (closed loop)"
    targets = list(dict.fromkeys(row["target"] for row in rows))
    written = []

    def by_target(metric: str, scale: float, ylabel: str, title: str, filename: str) -> None:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for target in targets:
            runs: dict[float, list[float]] = {}
            for r in rows:
                if r["target"] == target and r.get(metric) is not None and not math.isnan(r[metric]):
                    runs.setdefault(r[level_key], []).append(r[metric] * scale)
            if runs:
                points = [(level, sum(values) / len(values)) for level, values in sorted(runs.items())]
                repeats = max(len(values) for values in runs.values())
                label = target if repeats == 1 else f"{target} (mean of {repeats} runs)"
                ax.plot(*zip(*points, strict=True), marker="o", label=label)
        ax.set_xscale("log", base=2)
        levels = sorted({r[level_key] for r in rows})
        ax.set_xticks(levels, [f"{v:g}" for v in levels])
        ax.set_xlabel(level_title)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out / filename
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    by_target("output_tokens_per_s", 1, "output tokens/s", "Throughput", "throughput.png")
    by_target("ttft_p99", 1000, "p99 time to first token (ms)", "Tail time to first token", "ttft_p99.png")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for target in targets:
        top = max(r[level_key] for r in rows if r["target"] == target)
        values = latencies.get(f"{target} @ {top}", [])
        if values:
            ax.plot(values, [(i + 1) / len(values) for i in range(len(values))], label=f"{target} @ {top:g}")
    ax.set_xlabel("end-to-end latency (s)")
    ax.set_ylabel("fraction of requests")
    ax.set_title("Latency CDF at the highest load")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = out / "latency_cdf.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    return written


if __name__ == "__main__":  # python -m tokenmill.bench.plots DIR: redraw from a saved run
    import json
    import sys

    directory = Path(sys.argv[1])
    saved = directory / "requests.json"
    plot_all(
        json.loads((directory / "results.json").read_text()),
        json.loads(saved.read_text()) if saved.exists() else {},
        directory,
    )
