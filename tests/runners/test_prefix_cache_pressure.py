"""Mixed traffic through the engine core with the prefix cache on, in both engines: nothing leaks,
the cache stays within its budget, and a request is never refused or failed for the cache's sake.

Conversations that grow, prompts that share a system turn, eight apps' own system prompts (more
than the KV tier holds: they come back from host memory), one-off prompts, and aborts mid-prefill
and mid-decode; afterwards the scheduler holds no cell, no running sequence holds a KV cell (in
llama.cpp: no slot's sequence id is left on any cell; torch: the only blocks in use are the cached
prompts'), and each tier holds at most its budget (the host tier is small here, so it drops
copies too, and no copy outlives its entry).
60 requests in CI; `pytest --long` runs 1,000."""

from __future__ import annotations

import os
import random

import pytest

from tokenmill.engines.model_files import default_model_path
from tokenmill.engines.sequence import prepare_sequence
from tokenmill.generation import ChatMessage, GenerationRequest
from tokenmill.runners.engine_core import EngineCore
from tokenmill.runners.scheduler import SchedulerConfig
from tokenmill.sampling import SamplingParams

REQUESTS = 1000 if os.environ.get("TOKENMILL_LONG") else 40
BUDGET = 1024
HOST_BUDGET = 16 << 20  # copies of about 700 tokens: the host tier drops copies too


def _engine(kind: str):
    if kind == "llamacpp":
        from tokenmill.engines.llamacpp import LlamaCppEngine

        return LlamaCppEngine(
            default_model_path(),
            context_window=1024,
            max_sequences=8,
            kv_tokens=2048 + 256,
            threads=2,
            max_step_tokens=256,
            prefix_cache_tokens=BUDGET,
            host_cache_bytes=HOST_BUDGET,
        )
    pytest.importorskip("torch")
    from tokenmill.engines.torchlm.engine import TorchEngine

    return TorchEngine(
        default_model_path(),
        context_window=1024,
        max_sequences=8,
        kv_tokens=2048,
        threads=2,
        max_step_tokens=256,
        prefix_cache_tokens=BUDGET,
        host_cache_bytes=HOST_BUDGET,
    )


def _requests(count: int) -> list[tuple[tuple[ChatMessage, ...], int]]:
    rng = random.Random(7)
    system = ChatMessage("system", "You answer questions about lighthouses, briefly.")
    histories: list[tuple[ChatMessage, ...]] = [(system,) for _ in range(6)]
    apps = [
        ChatMessage("system", f"App {n}. " + " ".join(f"Rule {n}.{r}: be brief." for r in range(30))) for n in range(8)
    ]
    out = []
    for i in range(count):
        kind = rng.random()
        if kind < 0.5:  # a conversation's next turn
            n = rng.randrange(len(histories))
            histories[n] = (*histories[n][-6:], ChatMessage("user", f"Question {i}?"))
            out.append((histories[n], rng.randint(1, 6)))
            histories[n] += (ChatMessage("assistant", f"Answer {i}."),)
        elif kind < 0.7:  # the shared system turn, a new question
            out.append(((system, ChatMessage("user", f"Tell me fact {i}.")), rng.randint(1, 6)))
        elif kind < 0.85:  # one of 8 apps' own system prompts: more than the KV tier holds
            out.append(((apps[rng.randrange(len(apps))], ChatMessage("user", f"Help {i}.")), rng.randint(1, 6)))
        else:  # a one-off prompt
            out.append(((ChatMessage("user", f"{i} " * rng.randint(1, 60)),), rng.randint(1, 6)))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llamacpp", "torch"])
def test_mixed_traffic_leaves_no_cell_behind(kind):
    engine = _engine(kind)
    core = EngineCore(engine, SchedulerConfig(max_batch=8, kv_tokens=2048, max_step_tokens=256))
    rng = random.Random(11)
    try:
        pending = _requests(REQUESTS)
        finished = aborted = 0
        live: list[int] = []
        while pending or core.has_work:
            while pending and len(live) < 12:
                messages, max_tokens = pending.pop()
                params = SamplingParams(temperature=0, max_tokens=max_tokens)
                seq = prepare_sequence(GenerationRequest("r", params, messages=messages), engine.tokenizer)
                core.add(seq)
                live.append(seq.seq_id)
            if live and rng.random() < 0.05:  # a client leaves: mid-prefill, mid-decode or queued
                core.abort(live.pop(rng.randrange(len(live))))
                aborted += 1
            report = core.step()
            for seq_id in report.settled:
                if seq_id in live:
                    live.remove(seq_id)
                    finished += 1
            stats = core.stats()
            assert stats.prefix_cache.cached_tokens <= BUDGET
            assert stats.prefix_cache.host_bytes <= HOST_BUDGET
        assert finished + aborted == REQUESTS
        stats = core.stats()
        assert (stats.running, stats.waiting, stats.kv_tokens_used) == (0, 0, 0)
        assert 0 < stats.prefix_cache.cached_tokens <= BUDGET
        assert stats.prefix_cache.hit_tokens > stats.prefix_cache.queried_tokens // 4  # it was used
        assert stats.prefix_cache.host_hit_tokens > 0 and stats.prefix_cache.host_evictions > 0  # both tiers worked
        tiers = engine._prefix
        assert sorted(tiers._copies) == sorted(tiers.host.copies)  # no copy outlives its entry
        if kind == "llamacpp":
            import llama_cpp

            memory = llama_cpp.llama_get_memory(engine._ctx)
            end = lambda seq_id: llama_cpp.llama_memory_seq_pos_max(memory, seq_id) + 1
            assert [s for s in range(8) if end(s)] == []  # no slot keeps a cell
            index = tiers.index
            assert [h for h in index.holders if end(h)] == []  # a dropped entry keeps none either
            assert all(end(entry.holder) == len(entry.tokens) for entry in index.entries)
        else:
            from tokenmill.engines.torchlm.kv_cache import blocks_for

            assert engine.cache.num_sequences == 0
            held = {holder: blocks for holder, blocks in tiers._cells._stored.items()}
            assert sorted(held) == sorted(entry.holder for entry in tiers.index.entries)
            assert all(len(held[e.holder]) == blocks_for(len(e.tokens)) for e in tiers.index.entries)
            assert engine.cache.blocks_in_use == len({b for blocks in held.values() for b in blocks})
    finally:
        core.close()
