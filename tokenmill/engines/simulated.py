"""A simulated model: deterministic text and a realistic cost model, for tests and pattern studies.

Like httpx's MockTransport stands in for a network, this engine stands in for a model: it speaks
the same `StepEngine` protocol, so every serving pattern runs unchanged on it.

- Text is drawn from a fixed vocabulary by a per-sequence RNG: greedy requests depend only on the
  prompt, sampled ones on prompt + seed, unseeded sampled ones are random (as with a real model).
- A few multi-byte characters are split across two tokens, so the UTF-8 path is always exercised.
- Cost model: a step that prefills k prompts costs `ttft_ms * (1 + batch_cost * (k - 1))`, and
  decoding b sequences costs `itl_ms * (1 + batch_cost * (b - 1))`; the two add up.
- `gil="release"` waits in `time.sleep` (like a native library or I/O: other threads run);
  `gil="hold"` spins in pure Python (CPU-bound, competing for the GIL).
- Log-probabilities, when asked: a flat distribution over the vocabulary (plus the end token).
  Penalties and logit bias are not modelled: tests of those run on the real engines.
- Fault injection, for the reliability tests: at its `fault_at_step`-th step (counted from the
  engine's construction, so its warm-up is steps 1 and 2) `fault="crash"` kills the process it runs
  in with a real SIGSEGV, `"raise"` raises from `step()`, and `"bad_token"` returns a token id the
  tokenizer cannot decode, so the failure surfaces after the step, while tokens become text.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import re
import signal
import time
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from tokenmill.engines import logprobs
from tokenmill.engines.base import Chunk, DraftCosts, SampledLogprobs
from tokenmill.engines.chat_template import written_out
from tokenmill.engines.prefix_cache import PrefixCacheStats
from tokenmill.engines.sequence import Sequence
from tokenmill.generation import ChatMessage, ToolFunction
from tokenmill.tools import FORMATS, ToolCallFormat

GilMode = Literal["release", "hold"]
FaultKind = Literal["none", "crash", "raise", "bad_token"]

_WORDS = [
    "the",
    "a",
    "model",
    "token",
    "stream",
    "server",
    "batch",
    "request",
    "queue",
    "latency",
    "throughput",
    "engine",
    "serves",
    "answers",
    "quickly",
    "slowly",
    "every",
    "step",
    "of",
    "one",
    "each",
    "and",
    "or",
    "but",
    "then",
    "when",
    "while",
    "because",
    "so",
    "tokens",
    "flow",
    "through",
    "layers",
    "cache",
    "memory",
    "core",
    "thread",
    "process",
    "loop",
    "event",
    "worker",
    "replica",
    "prompt",
    "reply",
    "text",
    "data",
    "time",
    "fast",
    "steady",
    "bounded",
    "graceful",
    "drain",
    "timeout",
    "retry",
    "backoff",
]
# Multi-byte words, each split mid-character into two tokens.
_SPLIT_WORDS = (" café", " naïve", " 東京", " Ünïcode", " 🚀")
_PROMPT_TOKEN = re.compile(r"\s*\S+|\s+")


def _build_vocab() -> tuple[list[bytes], dict[int, int]]:
    vocab = [f" {w}".encode() for w in _WORDS] + [b".", b",", b"\n"]
    continuation: dict[int, int] = {}
    for word in _SPLIT_WORDS:
        raw = word.encode()
        cut = len(raw) - 1 if raw[-1] >= 0x80 else len(raw) - 2  # always inside a character
        while cut > 1 and (raw[cut] & 0xC0) != 0x80:
            cut -= 1
        vocab.append(raw[:cut])
        continuation[len(vocab) - 1] = len(vocab)
        vocab.append(raw[cut:])
    return vocab, continuation


_VOCAB, _CONTINUATION = _build_vocab()
_SECOND_HALVES = set(_CONTINUATION.values())
_FIRST_CHOICES = [i for i in range(len(_VOCAB)) if i not in _SECOND_HALVES]
EOS_ID = len(_VOCAB)


class SimulatedTokenizer:
    def __init__(self, context_window: int):
        self._context_window = context_window

    @property
    def context_window(self) -> int:
        return self._context_window

    def render_chat(self, messages: Seq[ChatMessage], tools: Seq[ToolFunction] = ()) -> str:
        turns = "".join(f"<|{m.role}|>\n{m.content}\n" for m in written_out(messages, tools, self.tool_call_format))
        return turns + "<|assistant|>\n"

    @property
    def tool_call_format(self) -> ToolCallFormat:
        return FORMATS["hermes"]

    @property
    def reasoning_format(self) -> None:
        return None  # its words hold no tags

    @property
    def vocab_size(self) -> int:
        return EOS_ID + 1

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        pieces = _PROMPT_TOKEN.findall(text)
        return [_stable_hash(p.encode("utf-8", "surrogatepass")) % EOS_ID for p in pieces]

    def token_bytes(self, token_id: int) -> bytes:
        return b"" if token_id == EOS_ID else _VOCAB[token_id]

    def is_end_of_generation(self, token_id: int) -> bool:
        return token_id == EOS_ID


@dataclass
class _SimState:
    rng: random.Random
    natural_length: int
    forced: list[int] = field(default_factory=list)


class SimulatedEngine:
    max_chunk_tokens = 512

    def __init__(
        self,
        *,
        context_window: int = 4096,
        ttft_ms: float = 50.0,
        itl_ms: float = 20.0,
        batch_cost: float = 0.1,
        gil: GilMode = "release",
        mean_reply_tokens: int = 48,
        fault: FaultKind = "none",
        fault_at_step: int = 1,
    ):
        self.tokenizer = SimulatedTokenizer(context_window)
        self._ttft_s = ttft_ms / 1000
        self._itl_s = itl_ms / 1000
        self._batch_cost = batch_cost
        self._gil = gil
        self._mean_reply = mean_reply_tokens
        self._states: dict[int, _SimState] = {}
        self._fault = fault
        self._fault_at_step = fault_at_step
        self.steps = 0

    def add_sequence(self, seq: Sequence) -> None:
        rng = random.Random(self._seed_material(seq))
        natural = max(1, int(rng.gauss(self._mean_reply, self._mean_reply / 3)))
        self._states[seq.seq_id] = _SimState(rng=rng, natural_length=natural)

    def remove_sequence(self, seq: Sequence) -> None:
        self._states.pop(seq.seq_id, None)

    draft_costs = DraftCosts()  # drafts are ignored: never worth sending

    def step(self, chunks: Seq[Chunk]) -> list[list[int]]:
        """Drafts are ignored (the protocol allows it): one token per finished chunk."""
        self.steps += 1
        fault = self._fault if self.steps == self._fault_at_step else "none"
        if fault == "crash":
            os.kill(os.getpid(), signal.SIGSEGV)
        if fault == "raise":
            raise RuntimeError(f"simulated engine fault at step {self.steps}")
        started = time.perf_counter()
        prefills = sum(1 for c in chunks if c.seq.num_computed < c.seq.num_prompt_tokens)
        decodes = len(chunks) - prefills
        self._burn(started, self._cost(prefills, self._ttft_s) + self._cost(decodes, self._itl_s))
        if fault == "bad_token":
            return [[EOS_ID + 1000] if c.completes_sequence_input else [] for c in chunks]
        for chunk in chunks:
            self._score_prompt(chunk.seq, chunk.num_tokens)
        return [[self._next_token(c.seq)] if c.completes_sequence_input else [] for c in chunks]

    def prefix_cache_stats(self) -> PrefixCacheStats:
        return PrefixCacheStats()  # no prefix cache: every prompt is "computed"

    def cached_prefix_length(self, tokens: list[int]) -> int | None:
        return None

    def close(self) -> None:
        self._states.clear()

    def _cost(self, rows: int, unit_s: float) -> float:
        return 0.0 if rows == 0 else unit_s * (1 + self._batch_cost * (rows - 1))

    def _burn(self, started: float, seconds: float) -> None:
        if self._gil == "release":
            remaining = seconds - (time.perf_counter() - started)
            if remaining > 0:
                time.sleep(remaining)
        else:
            deadline = started + seconds
            while time.perf_counter() < deadline:
                pass

    def _next_token(self, seq: Sequence) -> int:
        token = self._choose(seq)
        if seq.params.logprobs is not None:  # a flat distribution over the vocabulary, token first
            flat = -math.log(len(_VOCAB) + 1)
            others = [t for t in range(len(_VOCAB)) if t != token][: max(0, seq.params.logprobs - 1)]
            top = tuple((t, flat) for t in [token, *others])[: seq.params.logprobs]
            seq.note_logprobs(SampledLogprobs(token, flat, top))
        return token

    @staticmethod
    def _score_prompt(seq: Sequence, tokens: int) -> None:
        positions = logprobs.scored_positions(seq, seq.num_computed, tokens)
        if positions:  # the same flat distribution: every token ranks first among equals
            flat, k = -math.log(len(_VOCAB) + 1), seq.params.prompt_logprobs or 0
            targets = seq.token_ids[positions.start + 1 : positions.stop + 1]

            def top(token: int) -> tuple[tuple[int, float], ...]:
                return tuple((t, flat) for t in [token, *(o for o in range(k) if o != token)][:k])

            seq.note_prompt_logprobs([SampledLogprobs(t, flat, top(t), 1) for t in targets])

    def _choose(self, seq: Sequence) -> int:
        state = self._states[seq.seq_id]
        if state.forced:
            return state.forced.pop()
        generated = seq.num_generated
        may_end = generated >= seq.params.min_tokens and not seq.params.ignore_eos
        if may_end and generated >= state.natural_length:
            return EOS_ID
        token = state.rng.choice(_FIRST_CHOICES)
        if token in _CONTINUATION:
            state.forced.append(_CONTINUATION[token])
        return token

    @staticmethod
    def _seed_material(seq: Sequence) -> bytes:
        prompt = _stable_hash(repr(seq.token_ids[: seq.num_prompt_tokens]).encode())
        if seq.params.greedy:
            return f"greedy:{prompt}".encode()
        if seq.params.seed is not None:
            return f"seed:{seq.params.seed}:{prompt}".encode()
        return os.urandom(16)


def _stable_hash(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


class SimulatedEmbedder:
    """Embeddings for the simulated engine: a fixed random vector per token id, mean-pooled, so
    inputs that share words are near each other (enough to test the route, not to rank anything)."""

    dimensions = 64

    def embed(self, inputs: Seq[Seq[int]]) -> list[np.ndarray]:
        from tokenmill.engines.embeddings import unit

        return [
            unit(np.mean([np.random.default_rng(token).standard_normal(self.dimensions) for token in tokens], axis=0))
            for tokens in inputs
        ]

    def close(self) -> None:
        pass
