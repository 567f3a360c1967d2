"""Multi-turn workloads: the traffic a prefix cache is for.

`--conversations 8x6`: 8 conversations run at once, 6 turns each. Every turn resends the whole
history plus a new user message, as chat apps and agents do, then waits a think time before the
next. `--shared-prefix` puts the same long system prompt (about 1,000 tokens: instructions and a
tool list, written out as agents do) in front of every conversation, with short questions;
`--own-prefix` gives each conversation a system prompt of its own as long (many apps on one
server, each with its own instructions). `--round-robin` asks one turn at a time, each
conversation in turn, then each one's next turn: what a prefix cache must hold grows with the
number of conversations, and every TTFT is a request's own, with nothing else running.
Seeded: the same run sends the same messages. Greedy answers, `ignore_eos` to a fixed length, so
runs with the cache on and off do the same work.

Reported per turn index: TTFT p50/p99 and the share of prompt tokens served from the prefix cache
(`usage.prompt_tokens_details.cached_tokens`), and of those, restored from its host-memory tier
(tokenmill's /metrics, read after each round of a round-robin run); overall: output tokens/s.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass

import httpx

from tokenmill.bench.http1 import Http1Client
from tokenmill.bench.loadgen import stream_one
from tokenmill.bench.stats import percentile
from tokenmill.bench.workload import NOTE_TOOL, PROMPTS

FOLLOW_UPS = (
    "Can you say more about that?",
    "Give me one concrete example.",
    "What is the most common mistake here?",
    "Summarise that in one sentence.",
    "How would you explain it to a child?",
    "What should I read next about it?",
    "Is there a simpler way?",
    "What are the risks?",
)


def shared_system_prompt(app: int | None = None) -> str:
    """About 1,000 tokens of instructions and tools: the same for every conversation, or with
    `app`, that app's own (different from the first words on)."""
    rules = "\n".join(
        f"- Rule {i + 1}: when asked '{prompt}', answer briefly and cite no sources."
        for i, prompt in enumerate(PROMPTS * 2)
    )
    function = NOTE_TOOL["function"]
    tools = "\n".join(json.dumps({**function, "name": f"tool_{i}"}) for i in range(2))
    who = "a help desk" if app is None else f"app number {app}, {APP_KINDS[app % len(APP_KINDS)]}"
    return f"App {app}. " * (app is not None) + (
        f"You are the assistant of {who}. Follow these rules.\n{rules}\nYou may use these tools:\n{tools}"
    )


APP_KINDS = ("a bookshop", "a bank", "a hospital", "an airline", "a school", "a garage", "a hotel", "a library")


@dataclass(frozen=True)
class Conversations:
    count: int = 8
    turns: int = 6
    max_tokens: int = 32
    think_time: float = 0.5  # seconds between a reply and the next question (drawn 0.5x-1.5x)
    shared_prefix: bool = False
    own_prefix: bool = False
    round_robin: bool = False
    seed: int = 1234

    @classmethod
    def from_spec(cls, spec: str, **kwargs) -> Conversations:
        """'8x6' = 8 conversations of 6 turns."""
        count, _, turns = spec.lower().partition("x")
        return cls(count=int(count), turns=int(turns or 6), **kwargs)

    def opening(self, conversation: int) -> list[dict]:
        rng = random.Random(self.seed * 7919 + conversation)
        if self.own_prefix:
            system = shared_system_prompt(conversation)
        else:
            system = shared_system_prompt() if self.shared_prefix else "You are a helpful assistant."
        return [{"role": "system", "content": system}, {"role": "user", "content": rng.choice(PROMPTS)}]

    def follow_up(self, conversation: int, turn: int) -> str:
        return random.Random(self.seed * 104729 + conversation * 131 + turn).choice(FOLLOW_UPS)


@dataclass
class TurnRecord:
    conversation: int
    turn: int
    ttft: float | None = None
    output_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    error: str | None = None
    host_hit_tokens: float | None = None  # round-robin: the host tier's hit tokens in this turn's round, shared out


HOST_HITS = "tokenmill_prefix_cache_host_hit_tokens_total"


async def scrape_counter(url: str, name: str) -> float | None:
    """A counter from the server's /metrics (None where the server is not tokenmill)."""
    try:
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            response = await client.get("/metrics")
    except httpx.HTTPError:
        return None
    for line in response.text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


async def run_conversations(url: str, model: str, spec: Conversations) -> tuple[list[TurnRecord], float]:
    records: list[TurnRecord] = []
    async with Http1Client(url, timeout=300, max_connections=spec.count + 4) as client:
        histories = {number: spec.opening(number) for number in range(spec.count)}

        async def ask(number: int, turn: int) -> bool:
            """One turn of conversation `number`; False when it failed (the conversation ends)."""
            messages = histories[number]
            if turn:
                messages.append({"role": "user", "content": spec.follow_up(number, turn)})
            body = {
                "model": model,
                "messages": messages,
                "max_tokens": spec.max_tokens,
                "ignore_eos": True,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            answer: list[str] = []
            record = await stream_one(client, body, started, answer)
            error = None if record.status == "ok" else (record.error or record.status)
            records.append(
                TurnRecord(
                    number, turn, record.ttft, record.output_tokens, record.prompt_tokens, record.cached_tokens, error
                )
            )
            if error is not None:
                return False
            messages.append({"role": "assistant", "content": "".join(answer)})
            return True

        async def conversation(number: int) -> None:
            rng = random.Random(spec.seed + number)
            for turn in range(spec.turns):
                if not await ask(number, turn):
                    return
                await asyncio.sleep(spec.think_time * rng.uniform(0.5, 1.5))

        async def rounds() -> None:
            alive = set(range(spec.count))
            for turn in range(spec.turns):
                before = await scrape_counter(url, HOST_HITS)
                for number in sorted(alive):
                    if not await ask(number, turn):
                        alive.discard(number)
                after = await scrape_counter(url, HOST_HITS)
                if before is not None and after is not None:
                    done = [r for r in records if r.turn == turn and r.error is None]
                    cached = sum(r.cached_tokens for r in done)
                    for r in done:  # the round's host-tier hits, shared out by cached tokens
                        r.host_hit_tokens = (after - before) * r.cached_tokens / cached if cached else 0.0

        started = time.perf_counter()
        if spec.round_robin:
            await rounds()
        else:
            await asyncio.gather(*(conversation(i) for i in range(spec.count)))
        return records, time.perf_counter() - started


def per_turn_rows(label: str, records: list[TurnRecord], seconds: float) -> list[dict]:
    """One row per turn index, then an 'all' row with throughput and the overall hit rate."""
    rows = []
    for turn in sorted({r.turn for r in records}):
        done = [r for r in records if r.turn == turn and r.error is None and r.ttft is not None]
        ttfts = sorted(r.ttft for r in done if r.ttft is not None)
        rows.append(_row(label, str(turn + 1), done, ttfts, len([r for r in records if r.turn == turn])))
    done = [r for r in records if r.error is None and r.ttft is not None]
    total = _row(label, "all", done, sorted(r.ttft for r in done if r.ttft is not None), len(records))
    total["output_tok_s"] = sum(r.output_tokens for r in done) / seconds if seconds else 0.0
    rows.append(total)
    return rows


def _row(label: str, turn: str, done: list[TurnRecord], ttfts: list[float], sent: int) -> dict:
    prompt = sum(r.prompt_tokens for r in done)
    return {
        "target": label,
        "turn": turn,
        "ok": len(done),
        "errors": sent - len(done),
        "ttft_p50_ms": 1000 * percentile(ttfts, 50) if ttfts else None,
        "ttft_p99_ms": 1000 * percentile(ttfts, 99) if ttfts else None,
        "prompt_tokens_mean": prompt / len(done) if done else 0,
        "cache_hit_rate": sum(r.cached_tokens for r in done) / prompt if prompt else 0.0,
        "host_hit_rate": (
            sum(r.host_hit_tokens or 0.0 for r in done) / prompt
            if prompt and any(r.host_hit_tokens is not None for r in done)
            else None
        ),
    }


def table(rows: list[dict]) -> str:
    lines = [
        (
            "| target | turn | ok | errors | TTFT p50 ms | TTFT p99 ms | prompt tokens | cache hit rate | "
            "of which host RAM | output tok/s |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        fmt = lambda v: "" if v is None else f"{v:.0f}"
        tok_s = f"{r['output_tok_s']:.1f}" if "output_tok_s" in r else ""
        lines.append(
            f"| {r['target']} | {r['turn']} | {r['ok']} | {r['errors']} | {fmt(r['ttft_p50_ms'])} | "
            f"{fmt(r['ttft_p99_ms'])} | {r['prompt_tokens_mean']:.0f} | {r['cache_hit_rate']:.0%} | "
            f"{'' if r.get('host_hit_rate') is None else format(r['host_hit_rate'], '.0%')} | {tok_s} |"
        )
    return "\n".join(lines)
