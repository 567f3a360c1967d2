"""tools/profile_steps.py's grouping of py-spy's collapsed stacks: a sample counts where its most
telling frame says, not in the loops every sample passes through."""

from __future__ import annotations

import importlib.util
from pathlib import Path

TOOL = Path(__file__).parents[2] / "tools" / "profile_steps.py"
spec = importlib.util.spec_from_file_location("profile_steps", TOOL)
assert spec is not None and spec.loader is not None
profile_steps = importlib.util.module_from_spec(spec)
spec.loader.exec_module(profile_steps)

LOOP = "engine_main (tokenmill/runners/engine_worker.py:80);step (tokenmill/runners/engine_core.py:85)"


def test_samples_are_grouped_by_their_most_telling_frame(tmp_path):
    raw = tmp_path / "engine.txt"
    raw.write_text(
        "\n".join(
            [
                f"{LOOP};step (tokenmill/engines/llamacpp.py:310);llama_decode (libllama.so) 90",
                f"{LOOP};step (tokenmill/engines/llamacpp.py:330);sample (tokenmill/engines/llamacpp_sampling.py:60) 7",
                f"{LOOP};plan (tokenmill/runners/scheduler.py:100) 2",
                "engine_main (tokenmill/runners/engine_worker.py:70);poll (multiprocessing/connection.py:257) 1",
            ]
        )
    )
    groups = profile_steps.read_samples(raw)
    assert groups == {"model: llama_decode": 90, "sampling": 7, "scheduler": 2, "idle (waiting for work)": 1}
    table = profile_steps.table({("engine", 8): groups})
    assert "| model: llama_decode | 90% |" in table and "| sampling | 7% |" in table
