"""One real prefill and decode on a freshly built engine, before the server reports ready.

A fault in the model's kernels (llama.cpp's AMX matmul segfaulted at the first decode on some
Xeons) then shows at start-up, where an orchestrator sees a failed start, instead of killing the
server on a user's first request. The prompt is the chat template around one short message: a
multi-token prefill (the matrix-matrix kernels) followed by a one-row decode (the matrix-vector ones).
"""

from __future__ import annotations

from tokenmill.engines.base import StepEngine
from tokenmill.engines.replica import generate
from tokenmill.engines.sequence import Sequence
from tokenmill.generation import ChatMessage
from tokenmill.sampling import SamplingParams

WARM_UP_REQUEST_ID = "warm-up"


def warm_up(engine: StepEngine) -> None:
    tokenizer = engine.tokenizer
    prompt = tokenizer.encode(tokenizer.render_chat([ChatMessage("user", "Hello!")]))
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    seq = Sequence(WARM_UP_REQUEST_ID, prompt, params, 2, tokenizer)
    for _ in generate(engine, seq, lambda: False):
        pass
