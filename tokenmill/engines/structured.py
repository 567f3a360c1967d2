"""Constrained decoding: a JSON schema (OpenAI's `response_format`) or a Lark grammar (a forced tool
call) as a per-step token mask.

Built on llguidance (Microsoft's grammar engine behind guidance, also used by llama.cpp and vLLM):
a schema compiles to a grammar, a matcher per sequence tracks where the output is in it, and each
step the masks of every constrained sequence in the batch are computed together, in parallel
native threads outside the GIL (`fill_next_token_bitmask_par`). Why llguidance over xgrammar or
llama.cpp's GBNF sampler: it needs no torch (the default engine has none), it reads a llama.cpp
vocabulary directly, so both engines share one implementation, and it compiles a schema lazily (no
per-schema compile pause before the first token). docs/openai-api.md has the measured cost.

The engines own a `Constrained` each: `add`/`remove` with their sequences, `mask_rows` before
sampling, `accept` after it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence as Seq
from typing import TYPE_CHECKING

import numpy as np

from tokenmill.errors import InvalidRequest

if TYPE_CHECKING:
    import llguidance

    from tokenmill.engines.base import Tokenizer
    from tokenmill.engines.sequence import Sequence
    from tokenmill.sampling import OutputGrammar

log = logging.getLogger(__name__)


def grammar_for(grammar: OutputGrammar) -> str:
    """llguidance's grammar for a JSON schema or a Lark grammar."""
    import llguidance

    try:
        if grammar.kind == "json_schema":
            # compact JSON (no free whitespace): every token counts
            return llguidance.LLMatcher.grammar_from_json_schema(
                grammar.source, defaults={"whitespace_flexible": False, "coerce_one_of": True}
            )
        return llguidance.LLMatcher.grammar_from_lark(grammar.source)
    except ValueError as error:
        raise InvalidRequest(f"the {_what(grammar)} is not valid: {error}", param=grammar.param) from None


def _what(grammar: OutputGrammar) -> str:
    return "JSON schema" if grammar.kind == "json_schema" else "tools' grammar"


_TOKENIZERS: dict[int, llguidance.LLTokenizer] = {}
_TOKENIZERS_LOCK = threading.Lock()


def ll_tokenizer(vocab, n_vocab: int, eos_ids: Seq[int]) -> llguidance.LLTokenizer:
    """llguidance's view of a llama.cpp vocabulary (about a second to build: one per vocabulary).
    `n_vocab`: the logits row width, when the model pads its vocabulary."""
    import llguidance.llamacpp

    key = id(vocab)
    with _TOKENIZERS_LOCK:
        if key not in _TOKENIZERS:
            _TOKENIZERS[key] = llguidance.llamacpp.lltokenizer_from_vocab(
                vocab, n_vocab=n_vocab, eos_token=list(eos_ids)
            )
        return _TOKENIZERS[key]


def check_grammar(grammar: OutputGrammar, tokenizer: llguidance.LLTokenizer) -> None:
    """Raise a 400 naming the problem when the schema or grammar cannot be compiled."""
    import llguidance

    problem = llguidance.LLMatcher.validate_grammar(grammar_for(grammar), tokenizer)
    if problem:
        raise InvalidRequest(f"the {_what(grammar)} cannot be used: {problem}", param=grammar.param)


def structured_tokenizer(tokenizer: Tokenizer, param: str = "response_format") -> llguidance.LLTokenizer:
    """The grammar engine's tokenizer for a model tokenizer, or a 400 when it has none."""
    build = getattr(tokenizer, "structured_tokenizer", None)
    if build is None:
        raise InvalidRequest(
            f"{param} needs a model with a GGUF vocabulary (the llama.cpp or torch engine)", param=param
        )
    return build()


class Constrained:
    """The matchers of one engine's constrained sequences, and their batched masks."""

    def __init__(self, tokenizer: llguidance.LLTokenizer, vocab_size: int, threads: int = 1):
        import llguidance

        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._executor = llguidance.LLExecutor(num_threads=max(1, threads))
        self._matchers: dict[int, llguidance.LLMatcher] = {}

    def add(self, seq: Sequence) -> None:
        import llguidance

        grammar = seq.params.grammar
        if grammar is None:
            return
        matcher = llguidance.LLMatcher(self._tokenizer, grammar_for(grammar), log_level=0)
        if matcher.is_error():
            raise InvalidRequest(f"the {_what(grammar)} cannot be used: {matcher.get_error()}", param=grammar.param)
        self._matchers[seq.seq_id] = matcher

    def remove(self, seq: Sequence) -> None:
        self._matchers.pop(seq.seq_id, None)

    def constrains(self, seq: Sequence) -> bool:
        return seq.seq_id in self._matchers

    def mask_rows(self, seqs: Seq[Sequence]) -> np.ndarray | None:
        """[len(seqs), vocab] booleans, True where a token is allowed (every token for an
        unconstrained row), or None when no row is constrained. All masks in one parallel call."""
        import llguidance.numpy

        rows = [(self._matchers[s.seq_id], i) for i, s in enumerate(seqs) if s.seq_id in self._matchers]
        if not rows:
            return None
        bitmask = llguidance.numpy.allocate_token_bitmask(len(seqs), self._vocab_size)
        llguidance.numpy.fill_next_token_bitmask_par(self._executor, rows, bitmask)
        bits = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little")
        return bits[:, : self._vocab_size].astype(bool)

    def accept(self, seq: Sequence, token: int) -> None:
        matcher = self._matchers.get(seq.seq_id)
        if matcher is not None and not matcher.consume_token(token):
            # only a token forced past the mask gets here; the sequence goes on unconstrained
            # rather than failing the step that every other sequence shares
            log.warning("sequence %s left its grammar: %s", seq.request_id, matcher.get_error())
            del self._matchers[seq.seq_id]
