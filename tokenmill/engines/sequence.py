"""One state object per sequence, flowing through admission, scheduling, every step and output.

`Sequence` is pure bookkeeping: it turns sampled token ids into client-facing events (incremental
UTF-8 decoding, stop strings, length limits, usage). It never touches a model.
"""

from __future__ import annotations

import codecs
import itertools
from enum import Enum

from tokenmill.engines.base import SampledLogprobs, Tokenizer
from tokenmill.engines.stopping import StopMatcher
from tokenmill.errors import ContextLengthExceeded, InvalidRequest
from tokenmill.generation import (
    DEFAULT_SHARE,
    ChatMessage,
    Finished,
    FinishReason,
    GenerationRequest,
    PromptLogprobs,
    Share,
    TextDelta,
    TokenEvent,
    TokenLogprob,
    ToolFunction,
    TopLogprob,
    Usage,
)
from tokenmill.sampling import SamplingParams

_sequence_ids = itertools.count()


class SequenceStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"
    ABORTED = "aborted"


class Sequence:
    def __init__(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        max_new_tokens: int,
        tokenizer: Tokenizer,
        seq_id: int | None = None,  # given when the sequence is rebuilt in another process
        share: Share = DEFAULT_SHARE,
    ):
        self.seq_id = next(_sequence_ids) if seq_id is None else seq_id
        self.request_id = request_id
        self.share = share  # whose part of a step's prefill it takes (the scheduler's fairness)
        self.params = params
        self.max_new_tokens = max_new_tokens
        self.token_ids = list(prompt_ids)
        self.num_prompt_tokens = len(prompt_ids)
        self.num_computed = 0  # tokens already fed through the model (held in its KV cache)
        self.num_cached = 0  # prompt tokens an engine's prefix cache supplied (never computed here)
        self.status = SequenceStatus.WAITING
        self.finish_reason: FinishReason | None = None
        self._tokenizer = tokenizer
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = StopMatcher(params.stop)
        self._sampled_logprobs: SampledLogprobs | None = None  # the engine's, for the next token
        self._logprobs: list[TokenLogprob] = []  # tokens' entries not yet sent with a delta
        self._prompt_scores: list[SampledLogprobs] = []  # the engine's, for prompt tokens 1, 2, ...
        self._scoring_prompt = params.prompt_logprobs is not None  # until the prompt's entries are out

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_pending(self) -> int:
        """Tokens known but not yet fed to the model: the prompt at first, then the last sample."""
        return len(self.token_ids) - self.num_computed

    @property
    def kv_tokens_needed(self) -> int:
        """The most KV cells this sequence can ever occupy."""
        return self.num_prompt_tokens + self.max_new_tokens

    @property
    def is_finished(self) -> bool:
        return self.status in (SequenceStatus.FINISHED, SequenceStatus.ABORTED)

    def note_logprobs(self, sampled: SampledLogprobs) -> None:
        """The engine's log-probabilities for the token it returns next (when params ask for them)."""
        self._sampled_logprobs = sampled

    def note_prompt_logprobs(self, scored: list[SampledLogprobs]) -> None:
        """The engine's log-probabilities of the next prompt tokens (when params ask for them)."""
        self._prompt_scores.extend(scored)

    def append_token(self, token_id: int) -> list[TokenEvent]:
        """Record a sampled token; return what the client should see because of it."""
        if self._scoring_prompt:
            return self._after_scored_prompt(token_id)
        return self._append(token_id)

    def _after_scored_prompt(self, token_id: int) -> list[TokenEvent]:
        """The first token after a scored prompt: the prompt's entries go out first, in a delta of
        their own; with max_tokens 0 the sample is not part of the answer and the sequence ends."""
        if len(self._prompt_scores) != self.num_prompt_tokens - 1:
            raise RuntimeError(
                f"the engine scored {len(self._prompt_scores)} of {self.num_prompt_tokens - 1} prompt tokens"
            )
        first = self.token_ids[0]
        text, raw = self._text_of(first)
        scored = tuple(self._logprob_entry(entry) for entry in self._prompt_scores)
        self._prompt_scores, self._scoring_prompt = [], False
        opening = TextDelta("", (), 0, prompt_logprobs=PromptLogprobs(TopLogprob(text, raw, 0.0, first), scored))
        if self.max_new_tokens == 0:
            self._sampled_logprobs = None
            return [opening, *self._finish("length")]
        return [opening, *self._append(token_id)]

    def _append(self, token_id: int) -> list[TokenEvent]:
        self.token_ids.append(token_id)
        sampled, self._sampled_logprobs = self._sampled_logprobs, None
        if self._tokenizer.is_end_of_generation(token_id) and not self.params.ignore_eos:
            return self._finish("stop")  # the end token is not part of the answer, nor of its logprobs
        if sampled is not None:
            self._logprobs.append(self._logprob_entry(sampled))
        text = self._stop.feed(self._decoder.decode(self._tokenizer.token_bytes(token_id)))
        events: list[TokenEvent] = [self._delta(text)] if text else []
        if self._stop.stopped:
            events.extend(self._finish("stop"))
        elif self.num_generated >= self.max_new_tokens:
            events.extend(self._finish("length"))
        return events

    def abort(self) -> None:
        if not self.is_finished:
            self.status = SequenceStatus.ABORTED

    def _finish(self, reason: FinishReason) -> list[TokenEvent]:
        tail = "" if self._stop.stopped else self._stop.feed(self._decoder.decode(b"", final=True))
        tail += self._stop.flush()
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
        usage = Usage(self.num_prompt_tokens, self.num_generated, self.num_cached)
        events: list[TokenEvent] = [self._delta(tail)] if tail or self._logprobs else []
        events.append(Finished(reason=reason, usage=usage, stop_string=self._stop.matched))
        return events

    def _delta(self, text: str) -> TextDelta:
        """A delta carrying the logprobs of every token since the last one (text may lag tokens)."""
        if not self._logprobs:  # the usual case, once per token
            return TextDelta(text, (), self.num_generated)
        entries, self._logprobs = tuple(self._logprobs), []
        return TextDelta(text, entries, self.num_generated)

    def _text_of(self, token_id: int) -> tuple[str, tuple[int, ...]]:
        raw = self._tokenizer.token_bytes(token_id)
        return raw.decode("utf-8", errors="replace"), tuple(raw)

    def _logprob_entry(self, sampled: SampledLogprobs) -> TokenLogprob:
        top = tuple(TopLogprob(*self._text_of(token), logprob, token) for token, logprob in sampled.top)
        return TokenLogprob(*self._text_of(sampled.token_id), sampled.logprob, top, sampled.rank, sampled.token_id)


def chat_prompt(
    tokenizer: Tokenizer, messages: tuple[ChatMessage, ...], tools: tuple[ToolFunction, ...], continue_final: bool
) -> str:
    """The prompt of a chat: the template's, the assistant's turn opened, and with `continue_final`
    the last (assistant) message's text written into that turn for the model to continue, as
    llama.cpp's server and vLLM's `continue_final_message` do."""
    if not continue_final:
        return tokenizer.render_chat(messages, tools)
    return tokenizer.render_chat(messages[:-1], tools) + messages[-1].content


def prepare_sequence(
    request: GenerationRequest,
    tokenizer: Tokenizer,
    max_prompt_tokens: int | None = None,
    max_tokens_limit: int | None = None,
) -> Sequence:
    """Render, tokenize and size-check a request; raises InvalidRequest before any model work."""
    if request.messages is not None:
        text = chat_prompt(tokenizer, request.messages, request.tools, request.continue_final)
    else:
        assert request.prompt is not None
        text = request.prompt
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequest(
            "the prompt contains invalid Unicode (a lone surrogate)",
            param="prompt" if request.prompt is not None else "messages",
        ) from None
    grammar = request.params.grammar
    if grammar is not None:
        from tokenmill.engines.structured import check_grammar, structured_tokenizer

        check_grammar(grammar, structured_tokenizer(tokenizer, grammar.param))
    vocab = tokenizer.vocab_size
    if any(token >= vocab for token, _ in request.params.logit_bias):
        raise InvalidRequest(
            f"logit_bias names a token id outside the vocabulary (0 to {vocab - 1})", param="logit_bias"
        )
    prompt_ids = tokenizer.encode(text)
    if not prompt_ids:
        raise InvalidRequest("the prompt is empty", param="prompt" if request.prompt is not None else "messages")
    param = "prompt" if request.prompt is not None else "messages"
    if max_prompt_tokens is not None and len(prompt_ids) > max_prompt_tokens:
        raise InvalidRequest(
            f"The prompt has {len(prompt_ids)} tokens; this server accepts at most {max_prompt_tokens}.", param=param
        )
    if max_tokens_limit is not None and (request.params.max_tokens or 0) > max_tokens_limit:
        raise InvalidRequest(f"max_tokens may be at most {max_tokens_limit} on this server.", param="max_tokens")
    window = tokenizer.context_window
    room = window - len(prompt_ids)
    requested = request.params.max_tokens
    if room < (0 if requested == 0 else 1) or (requested is not None and requested > room):
        asked = f" and {requested} for the completion" if requested is not None else ""
        raise ContextLengthExceeded(
            f"This model's maximum context length is {window} tokens; the request has "
            f"{len(prompt_ids)} tokens in the prompt{asked}. Shorten the prompt or lower max_tokens.",
            param="messages" if request.messages is not None else "prompt",
        )
    max_new = requested if requested is not None else room
    if max_tokens_limit is not None:
        max_new = min(max_new, max_tokens_limit)
    return Sequence(request.request_id, prompt_ids, request.params, max_new, tokenizer, share=request.share)
