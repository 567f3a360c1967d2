"""The torch engine's decode rate on its own: the real scheduler and engine in a closed loop of N
sequences, no HTTP, no server. For a device the bench cannot reach as a server (a lent GPU machine),
and to tell the engine's ceiling from what the layers above it cost.

    python tools/engine_rate.py --device cuda --concurrency 1,8,32 --tokens 64

Prints one markdown row per concurrency: output tokens/s over the timed requests, and the mean step.
"""

from __future__ import annotations

import argparse
import time

import torch

from tokenmill.engines.model_files import default_model_path
from tokenmill.engines.sequence import Sequence, prepare_sequence
from tokenmill.engines.torchlm.engine import TorchEngine
from tokenmill.generation import GenerationRequest
from tokenmill.runners.engine_core import EngineCore
from tokenmill.runners.scheduler import SchedulerConfig
from tokenmill.sampling import SamplingParams

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def closed_loop(engine: TorchEngine, concurrency: int, tokens: int, requests: int) -> tuple[float, float]:
    """(output tokens/s, mean step ms) over `requests` requests, `concurrency` running at once,
    stepped by batch mode's own EngineCore."""
    core = EngineCore(engine, SchedulerConfig(max_batch=concurrency, kv_tokens=concurrency * 512, max_step_tokens=512))
    sent = done = steps = 0

    def new() -> Sequence:
        nonlocal sent
        sent += 1
        params = SamplingParams(temperature=0.7, seed=sent, max_tokens=tokens, ignore_eos=True)
        return prepare_sequence(GenerationRequest(str(sent), params, prompt=PROMPT), engine.tokenizer)

    for _ in range(concurrency):
        core.add(new())
    started = time.perf_counter()
    while done < requests:
        report = core.step()
        steps += 1
        for _ in report.settled:
            done += 1
            if sent < requests:
                core.add(new())
    seconds = time.perf_counter() - started
    return done * tokens / seconds, 1000 * seconds / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--requests-per-slot", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    engine = TorchEngine(
        default_model_path(),
        context_window=1024,
        max_sequences=max(levels),
        kv_tokens=max(levels) * 512,
        threads=args.threads or None,
        dtype=args.dtype,
        device=args.device,
    )
    name = torch.cuda.get_device_name() if engine.device.type == "cuda" else "cpu"
    print("| device | concurrency | output tok/s | mean step ms |\n|---|---|---|---|")
    for concurrency in levels:
        closed_loop(engine, concurrency, 8, concurrency)  # warm-up: shapes, allocator, kernels
        rate, step_ms = closed_loop(engine, concurrency, args.tokens, concurrency * args.requests_per_slot)
        print(f"| {name} | {concurrency} | {rate:.0f} | {step_ms:.1f} |", flush=True)


if __name__ == "__main__":
    main()
