"""Sequence bookkeeping: UTF-8 across tokens, stops, length, EOS, usage, context checks."""

from __future__ import annotations

import pytest

from tokenmill.engines.sequence import SequenceStatus, prepare_sequence
from tokenmill.errors import ContextLengthExceeded, InvalidRequest
from tokenmill.generation import ChatMessage, Finished, GenerationRequest, TextDelta
from tokenmill.sampling import SamplingParams

EOS = 0


class ByteTokenizer:
    """Token id = a byte value; 0 is end-of-generation. Enough to drive a Sequence."""

    context_window = 32
    vocab_size = 256

    def render_chat(self, messages, tools=()):
        return "".join(f"{m.role}:{m.content};" for m in messages)

    def encode(self, text):
        return list(text.encode())

    def token_bytes(self, token_id):
        return bytes([token_id])

    def is_end_of_generation(self, token_id):
        return token_id == EOS


def sequence(prompt: str = "hi", **params):
    request = GenerationRequest(request_id="r", params=SamplingParams(**params), prompt=prompt)
    return prepare_sequence(request, ByteTokenizer())


def feed(seq, data: bytes):
    events = []
    for byte in data:
        events.extend(seq.append_token(byte))
    return events


def text_of(events) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDelta))


def test_multibyte_character_split_across_tokens_is_never_emitted_broken():
    seq = sequence(max_tokens=20)
    events = feed(seq, "é東".encode())  # 2 + 3 bytes, one byte per token
    assert [e.text for e in events] == ["é", "東"]


def test_length_limit_finishes_with_usage():
    seq = sequence(max_tokens=3)
    events = feed(seq, b"abc")
    assert text_of(events) == "abc"
    assert events[-1] == Finished("length", usage=events[-1].usage)
    assert (events[-1].usage.prompt_tokens, events[-1].usage.completion_tokens) == (2, 3)
    assert seq.status is SequenceStatus.FINISHED


def test_eos_finishes_with_stop_and_is_not_emitted():
    seq = sequence(max_tokens=10)
    events = feed(seq, b"ok") + seq.append_token(EOS)
    assert text_of(events) == "ok"
    assert isinstance(events[-1], Finished) and events[-1].reason == "stop"


def test_ignore_eos_keeps_going():
    seq = sequence(max_tokens=3, ignore_eos=True)
    seq.append_token(EOS)
    assert not seq.is_finished
    events = feed(seq, b"ab")
    assert events[-1].reason == "length" and events[-1].usage.completion_tokens == 3


def test_stop_string_across_tokens():
    seq = sequence(max_tokens=20, stop=("<end>",))
    events = feed(seq, b"answer<en") + feed(seq, b"d>more")
    assert text_of(events) == "answer"
    assert events[-1].reason == "stop"
    assert seq.is_finished


def test_held_back_partial_stop_is_released_at_length_limit():
    seq = sequence(max_tokens=4, stop=("xyz",))
    events = feed(seq, b"abxy")
    assert text_of(events) == "abxy"
    assert events[-1].reason == "length"


def test_chat_messages_are_rendered_by_the_tokenizer():
    request = GenerationRequest(request_id="r", params=SamplingParams(), messages=(ChatMessage("user", "x"),))
    seq = prepare_sequence(request, ByteTokenizer())
    assert bytes(seq.token_ids).decode() == "user:x;"
    assert seq.max_new_tokens == 32 - len("user:x;")  # default: the rest of the window


def test_prompt_filling_the_window_is_refused():
    with pytest.raises(ContextLengthExceeded):
        sequence(prompt="x" * 32)


def test_max_tokens_beyond_the_window_is_refused():
    with pytest.raises(ContextLengthExceeded):
        sequence(prompt="x" * 10, max_tokens=23)
    assert sequence(prompt="x" * 10, max_tokens=22).kv_tokens_needed == 32


def test_empty_prompt_is_refused():
    with pytest.raises(InvalidRequest):
        sequence(prompt="")


def test_a_character_cut_by_the_length_limit_ends_as_one_replacement_character():
    seq = sequence(max_tokens=2)
    events = feed(seq, "a東".encode()[:2])  # 'a' and the first byte of a 3-byte character
    assert text_of(events) == "a\ufffd"
    assert events[-1].reason == "length"
