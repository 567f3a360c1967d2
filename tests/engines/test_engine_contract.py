"""What every real engine must do the same way, run against each: llama.cpp and torch.

The scheduler, the sequence bookkeeping and the HTTP layer only see the StepEngine protocol, so a
second engine passing this suite is what proves the protocol is the right one.
"""

from __future__ import annotations

import pytest

from tokenmill.cpus import available_cpus
from tokenmill.engines.model_files import default_model_path
from tokenmill.engines.replica import generate
from tokenmill.engines.sequence import prepare_sequence
from tokenmill.generation import ChatMessage, GenerationRequest, TextDelta
from tokenmill.sampling import SamplingParams

PROMPTS = ["Once upon a time", "def fibonacci(n):", "La capitale de la France est"]


def _llamacpp(prefix_cache_tokens: int = 0, host_cache_bytes: int = 0):
    from tokenmill.engines.llamacpp import LlamaCppEngine

    return LlamaCppEngine(
        default_model_path(),
        context_window=2048,
        threads=available_cpus(),
        prefix_cache=prefix_cache_tokens > 0,
        prefix_cache_tokens=prefix_cache_tokens,
        host_cache_bytes=host_cache_bytes,
    )


def _llamacpp_streams(prefix_cache_tokens: int = 0, host_cache_bytes: int = 0):
    """A KV stream per sequence (`--kv-streams`): cached prompts are host-memory copies."""
    from tokenmill.engines.llamacpp import LlamaCppEngine

    return LlamaCppEngine(
        default_model_path(),
        context_window=2048,
        max_sequences=4,
        threads=available_cpus(),
        prefix_cache=prefix_cache_tokens > 0,
        prefix_cache_tokens=prefix_cache_tokens,
        host_cache_bytes=host_cache_bytes,
        kv_streams=True,
    )


def _torch(prefix_cache_tokens: int = 0, dtype: str = "bfloat16", host_cache_bytes: int = 0):
    pytest.importorskip("torch")
    from tokenmill.engines.torchlm.engine import TorchEngine

    return TorchEngine(
        default_model_path(),
        context_window=2048,
        threads=available_cpus(),
        prefix_cache_tokens=prefix_cache_tokens,
        dtype=dtype,
        host_cache_bytes=host_cache_bytes,
    )


BUILD = {"llamacpp": _llamacpp, "llamacpp-streams": _llamacpp_streams, "torch": _torch}


@pytest.fixture(scope="module", params=["llamacpp", "torch"])
def engine(request):
    engine = BUILD[request.param]()  # no prefix cache: these tests compare with references
    yield engine
    engine.close()


def complete(engine, prompt: str | None = None, messages=None, **params) -> tuple[str, object]:
    request = GenerationRequest(request_id="t", params=SamplingParams(**params), prompt=prompt, messages=messages)
    seq = prepare_sequence(request, engine.tokenizer)
    events = list(generate(engine, seq, lambda: False))
    return "".join(e.text for e in events if isinstance(e, TextDelta)), events[-1]


def test_chat_template_comes_from_the_model_metadata(engine):
    rendered = engine.tokenizer.render_chat((ChatMessage("user", "hi"),))
    assert rendered.startswith("<|im_start|>system\n")  # SmolLM2's template adds its default system turn
    assert rendered.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_answers_a_factual_question(engine):
    messages = (
        ChatMessage("system", "You are a helpful assistant."),
        ChatMessage("user", "What is the capital of France?"),
    )
    text, finished = complete(engine, messages=messages, temperature=0, max_tokens=30)
    assert "Paris" in text
    assert finished.reason == "stop"  # the model ended its turn itself


def test_seed_repeats_and_varies(engine):
    run = lambda seed: complete(engine, "Tell me a story:", temperature=0.9, seed=seed, max_tokens=24)[0]
    assert run(7) == run(7)
    assert run(7) != run(8)


def test_stop_string_is_honoured_and_not_emitted(engine):
    full, _ = complete(engine, PROMPTS[0], temperature=0, max_tokens=32)
    word = full.split()[3]
    cut, finished = complete(engine, PROMPTS[0], temperature=0, max_tokens=32, stop=(word,))
    assert finished.reason == "stop"
    assert cut == full[: full.index(word)]


def test_ignore_eos_and_min_tokens_generate_past_the_natural_end(engine):
    messages = (
        ChatMessage("system", "You are a helpful assistant."),
        ChatMessage("user", "What is the capital of France?"),
    )
    natural = complete(engine, messages=messages, temperature=0, max_tokens=60)[1].usage.completion_tokens
    forced = complete(engine, messages=messages, temperature=0, max_tokens=60, ignore_eos=True)[1]
    assert forced.reason == "length" and forced.usage.completion_tokens == 60 > natural
    at_least = complete(engine, messages=messages, temperature=0, max_tokens=60, min_tokens=natural + 5)[1]
    assert at_least.usage.completion_tokens >= natural + 5


def test_utf8_is_never_emitted_broken(engine):
    # Greedy continuations full of multi-byte characters split across tokens: the byte-level vocabulary
    # spells most kana's three UTF-8 bytes in two tokens.
    accents, _ = complete(
        engine,
        "Les mots français avec accents: café, crème brûlée, déjà vu, naïve, résumé, élève, été, où, ",
        temperature=0,
        max_tokens=40,
    )
    japanese, _ = complete(engine, "日本の首都は", temperature=0, max_tokens=40)
    assert "\ufffd" not in accents + japanese
    assert "été" in accents
    assert sum("\u3040" <= ch <= "\u30ff" for ch in japanese) >= 10  # kana came through whole


def test_cancellation_stops_within_one_step(engine):
    calls = 0

    def cancelled() -> bool:
        nonlocal calls
        calls += 1
        return calls > 3

    request = GenerationRequest(
        request_id="t", params=SamplingParams(max_tokens=100, ignore_eos=True), prompt=PROMPTS[0]
    )
    seq = prepare_sequence(request, engine.tokenizer)
    events = list(generate(engine, seq, cancelled))
    assert len(events) == 3 and seq.status.value == "aborted"


def _logprobs_of(engine, prompt: str, **params):
    from tokenmill.generation import Finished

    request = GenerationRequest(request_id="t", params=SamplingParams(**params), prompt=prompt)
    seq = prepare_sequence(request, engine.tokenizer)
    events = list(generate(engine, seq, lambda: False))
    assert isinstance(events[-1], Finished)
    return seq, [entry for e in events if isinstance(e, TextDelta) for entry in e.logprobs]


def test_greedy_tokens_are_the_top_of_their_logprobs(engine):
    import math

    seq, entries = _logprobs_of(engine, PROMPTS[0], temperature=0, max_tokens=24, ignore_eos=True, logprobs=20)
    generated = seq.token_ids[seq.num_prompt_tokens :]
    assert len(entries) == len(generated) == 24
    for token_id, entry in zip(generated, entries, strict=True):
        assert len(entry.top) == 20
        assert entry.token_bytes == tuple(engine.tokenizer.token_bytes(token_id))
        assert entry.top[0].token_bytes == entry.token_bytes and entry.top[0].logprob == entry.logprob
        assert [t.logprob for t in entry.top] == sorted((t.logprob for t in entry.top), reverse=True)
        assert sum(math.exp(t.logprob) for t in entry.top) <= 1.0 + 1e-6
        assert entry.logprob <= 0.0


def test_logit_bias_minus_100_bans_a_token(engine):
    seq, _ = _logprobs_of(engine, PROMPTS[0], temperature=0, max_tokens=24, ignore_eos=True)
    favourite = max(set(seq.token_ids[seq.num_prompt_tokens :]), key=seq.token_ids.count)
    banned, _ = _logprobs_of(
        engine, PROMPTS[0], temperature=0, max_tokens=24, ignore_eos=True, logit_bias=((favourite, -100.0),)
    )
    assert favourite not in banned.token_ids[banned.num_prompt_tokens :]
    for seed in range(3):  # sampled too
        drawn, _ = _logprobs_of(
            engine, PROMPTS[0], seed=seed, max_tokens=24, ignore_eos=True, logit_bias=((favourite, -100.0),)
        )
        assert favourite not in drawn.token_ids[drawn.num_prompt_tokens :]


def test_penalties_reduce_repeats_over_100_tokens(engine):
    # measured (both engines): plain greedy repeats 98 of 100 tokens; the penalties 40, 53 and 1-3
    def repeats(**params) -> int:
        seq, _ = _logprobs_of(engine, "List the numbers, one per line:", max_tokens=100, ignore_eos=True, **params)
        generated = seq.token_ids[seq.num_prompt_tokens :]
        return len(generated) - len(set(generated))

    plain = repeats(temperature=0)
    for penalty in ({"frequency_penalty": 1.5}, {"presence_penalty": 1.5}, {"repetition_penalty": 1.3}):
        penalized = repeats(temperature=0, **penalty)
        assert penalized < 0.8 * plain, (penalty, plain, penalized)


def _greedy(engine, history) -> list:
    request = GenerationRequest("t", SamplingParams(temperature=0, max_tokens=24, logprobs=5), messages=history)
    events = generate(engine, prepare_sequence(request, engine.tokenizer), lambda: False)
    return [entry for event in events if isinstance(event, TextDelta) for entry in event.logprobs]


@pytest.mark.parametrize("kind", ["llamacpp", "llamacpp-streams", "torch"])
def test_a_conversation_reuses_its_history_and_answers_as_without_the_cache(kind):
    """Greedy, four turns, each resending the history (the cache-off engine's answers, so both see
    the same prompts). Token for token the same up to a near tie: neither engine's arithmetic is
    the same when a prompt is cut into batches differently (a cached start was computed apart from
    the rest, and llama.cpp's attention also varies with other cells in use), so where the tokens
    part, the cache-off engine must rate the cached engine's token within NEAR_TIE_LOGITS of its
    own. A wrong cell (a holder mixed up, a position off by one) costs whole logits."""
    from tests.engines.near_ties import NEAR_TIE_LOGITS

    cached, exact_engine = BUILD[kind](prefix_cache_tokens=2048), BUILD[kind]()
    try:
        history: tuple[ChatMessage, ...] = (ChatMessage("system", "You are a concise assistant."),)
        questions = ("What is a lighthouse?", "How tall can they be?", "Name a famous one.", "Who keeps it?")
        reused = []
        for question in questions:
            history += (ChatMessage("user", question),)
            before = cached.prefix_cache_stats().hit_tokens
            mine_all, exact = _greedy(cached, history), _greedy(exact_engine, history)
            reused.append(cached.prefix_cache_stats().hit_tokens - before)
            for mine, theirs in zip(mine_all, exact, strict=False):
                if mine.token != theirs.token:
                    alternatives = {alt.token: alt.logprob for alt in theirs.top}
                    assert mine.token in alternatives, f"{question}: {mine.token!r} is not among {alternatives}"
                    assert theirs.logprob - alternatives[mine.token] < NEAR_TIE_LOGITS, question
                    break
            history += (ChatMessage("assistant", "".join(entry.token for entry in exact)),)
        # every turn after the first finds the conversation so far: its last prompt at least
        assert reused[0] == 0 and all(later > 20 for later in reused[1:]), reused
        assert exact_engine.prefix_cache_stats().hit_tokens == 0
    finally:
        cached.close()
        exact_engine.close()


def test_in_fp32_the_torch_engines_answers_with_and_without_the_cache_are_identical():
    """fp32 leaves no near tie to hide behind: with the cache on, a conversation's turns reuse the
    earlier turns' KV blocks (shared whole, a partial last block copied) and must answer exactly as
    an engine that computes every prompt whole."""
    cached, exact_engine = _torch(prefix_cache_tokens=2048, dtype="float32"), _torch(dtype="float32")
    try:
        history: tuple[ChatMessage, ...] = (ChatMessage("system", "You are a concise assistant."),)
        for question in ("What is a lighthouse?", "How tall can they be?", "Name a famous one."):
            history += (ChatMessage("user", question),)
            mine, exact = _greedy(cached, history), _greedy(exact_engine, history)
            assert [entry.token for entry in mine] == [entry.token for entry in exact], question
            history += (ChatMessage("assistant", "".join(entry.token for entry in exact)),)
        assert cached.prefix_cache_stats().hit_tokens > 60
    finally:
        cached.close()
        exact_engine.close()


@pytest.mark.parametrize("kind", ["llamacpp", "llamacpp-streams", "torch"])
def test_the_next_turn_finds_the_last_answer_cached_not_only_the_last_prompt(kind):
    """A finished sequence's whole text goes to the cache, answer included: the next turn resends
    it, and only the new question is left to prefill (the answer's last token is never computed,
    and the chat template closes the turn after it)."""
    engine = BUILD[kind](prefix_cache_tokens=2048)
    try:
        history = (ChatMessage("system", "You are a concise assistant."), ChatMessage("user", "What is a lighthouse?"))
        first = prepare_sequence(
            GenerationRequest("1", SamplingParams(temperature=0, max_tokens=24), messages=history), engine.tokenizer
        )
        answer = "".join(e.text for e in generate(engine, first, lambda: False) if isinstance(e, TextDelta))
        answered = first.num_computed  # the prompt and every answer token but the last
        assert answered > first.num_prompt_tokens + 10
        history += (ChatMessage("assistant", answer), ChatMessage("user", "How tall can they be?"))
        second = prepare_sequence(
            GenerationRequest("2", SamplingParams(temperature=0, max_tokens=4), messages=history), engine.tokenizer
        )
        assert second.token_ids[:answered] == first.token_ids[:answered]  # the answer re-encodes the same
        list(generate(engine, second, lambda: False))
        assert second.num_cached == answered
    finally:
        engine.close()


@pytest.mark.parametrize("kind", ["llamacpp", "llamacpp-streams", "torch"])
def test_a_prompt_repeated_without_its_answer_gives_the_answer_cells_back_and_still_hits(kind):
    """A single-turn app sends the same prompt again: the cached answer (never resent) is cleared
    from its entry, which keeps the prompt; the next repeat still finds it. Greedy answers agree up
    to a near tie (as in the conversation test above): clearing the holder's answer must not touch
    the cells a running sequence reads, which would cost whole logits."""
    from tests.engines.near_ties import NEAR_TIE_LOGITS

    engine = BUILD[kind](prefix_cache_tokens=2048)
    try:
        history = (ChatMessage("system", "You are a concise assistant."), ChatMessage("user", "What is a lighthouse?"))
        answers, prompt = [], 0
        for i in range(3):
            request = GenerationRequest(
                str(i), SamplingParams(temperature=0, max_tokens=16, logprobs=5), messages=history
            )
            seq = prepare_sequence(request, engine.tokenizer)
            events = generate(engine, seq, lambda: False)
            answers.append([entry for event in events if isinstance(event, TextDelta) for entry in event.logprobs])
            prompt = seq.num_prompt_tokens
            if i == 0:
                assert engine.prefix_cache_stats().cached_tokens > prompt + 10  # the answer was cached too
            else:
                assert seq.num_cached == prompt - 1
                assert engine.prefix_cache_stats().cached_tokens == prompt  # the prompt alone
        for mine, theirs in zip(answers[2], answers[0], strict=True):
            if mine.token != theirs.token:
                alternatives = {alt.token: alt.logprob for alt in theirs.top}
                assert mine.token in alternatives, f"{mine.token!r} is not among {alternatives}"
                assert theirs.logprob - alternatives[mine.token] < NEAR_TIE_LOGITS
                break
    finally:
        engine.close()


def _app_prompt(app: int) -> tuple[ChatMessage, ...]:
    """An app's own system prompt (about 170 tokens), unlike the others' from its first words."""
    rules = " ".join(f"Rule {i}: answer questions about topic {app * 100 + i} briefly." for i in range(12))
    return (ChatMessage("system", f"App {app} of ours. {rules}"), ChatMessage("user", "What can you do?"))


@pytest.mark.parametrize("kind", ["llamacpp", "llamacpp-streams", "torch"])
def test_prompts_the_kv_tier_cannot_keep_are_restored_from_host_memory(kind):
    """Four apps' system prompts, the KV tier room for about two: asked again in turn, every one
    starts from a cached copy (the host tier's where the KV tier dropped it), all but the last
    token, and answers as before (up to a near tie: see the conversation test)."""
    from tests.engines.near_ties import NEAR_TIE_LOGITS

    engine = BUILD[kind](prefix_cache_tokens=400, host_cache_bytes=64 << 20)
    try:
        first = {}
        for app in range(4):
            first[app] = _greedy(engine, _app_prompt(app))
        assert engine.prefix_cache_stats().evictions >= 2 and engine.prefix_cache_stats().host_entries >= 2
        restored = 0  # apps whose prompt came back whole from host memory
        for app in range(4):
            before = engine.prefix_cache_stats()
            request = GenerationRequest(
                "t", SamplingParams(temperature=0, max_tokens=24, logprobs=5), messages=_app_prompt(app)
            )
            seq = prepare_sequence(request, engine.tokenizer)
            events = generate(engine, seq, lambda: False)
            again = [entry for event in events if isinstance(event, TextDelta) for entry in event.logprobs]
            assert seq.num_cached == seq.num_prompt_tokens - 1, app
            after = engine.prefix_cache_stats()
            assert after.hit_tokens - before.hit_tokens == seq.num_cached
            restored += after.host_hit_tokens - before.host_hit_tokens == seq.num_cached
            for mine, theirs in zip(again, first[app], strict=True):
                if mine.token != theirs.token:
                    alternatives = {alt.token: alt.logprob for alt in theirs.top}
                    assert mine.token in alternatives, f"{mine.token!r} is not among {alternatives}"
                    assert theirs.logprob - alternatives[mine.token] < NEAR_TIE_LOGITS
                    break
        assert restored >= 2  # the KV tier holds two at most: the others were dropped and restored
        assert engine.prefix_cache_stats().host_bytes <= 64 << 20
    finally:
        engine.close()


SCORED = "The quick brown fox jumps over the lazy dog. Paris is the capital of France, and Rome of Italy."


def _scored(engine, prompt: str = SCORED, **params):
    """A scored prompt's (sequence, its PromptLogprobs, every event)."""
    request = GenerationRequest(request_id="t", params=SamplingParams(temperature=0, **params), prompt=prompt)
    seq = prepare_sequence(request, engine.tokenizer)
    events = list(generate(engine, seq, lambda: False))
    opening = events[0]
    assert isinstance(opening, TextDelta) and opening.text == "" and opening.prompt_logprobs is not None
    return seq, opening.prompt_logprobs, events


def test_a_scored_prompt_has_one_entry_per_token_with_its_rank_and_alternatives(engine):
    import math

    seq, prompt, events = _scored(engine, max_tokens=0, prompt_logprobs=5)
    ids = seq.token_ids[: seq.num_prompt_tokens]
    assert prompt.first.token_id == ids[0] and len(prompt.scored) == len(ids) - 1
    assert [entry.token_id for entry in prompt.scored] == ids[1:]
    for entry in prompt.scored:
        assert len(entry.top) == 5 and [t.logprob for t in entry.top] == sorted(
            (t.logprob for t in entry.top), reverse=True
        )
        assert entry.logprob <= 0 and sum(math.exp(t.logprob) for t in entry.top) <= 1 + 1e-6
        ranked_above = sum(1 for t in entry.top if t.logprob > entry.logprob)
        assert entry.rank is not None and (entry.rank == ranked_above + 1 or (entry.rank > 5 and ranked_above == 5))
        if entry.rank == 1:  # the most likely token: the top alternative is itself (near ties aside)
            assert entry.top[0].token_id == entry.token_id or entry.top[0].logprob == pytest.approx(entry.logprob)
    # max_tokens 0: nothing is generated
    assert [type(e).__name__ for e in events] == ["TextDelta", "Finished"]
    assert events[-1].reason == "length" and events[-1].usage.completion_tokens == 0


def test_a_scored_prompt_is_computed_whole_even_when_its_start_is_cached(request, engine):
    """The prefix cache would skip the shared start's logits: a scored prompt takes nothing from it."""
    cached = BUILD[request.node.callspec.params["engine"]](prefix_cache_tokens=1024)
    try:
        complete(cached, SCORED, temperature=0, max_tokens=4)  # the prompt is cached now
        seq, prompt, events = _scored(cached, max_tokens=3, prompt_logprobs=0)
        assert seq.num_cached == 0 and events[-1].usage.cached_tokens == 0
        assert len(prompt.scored) == seq.num_prompt_tokens - 1
        _, fresh, _ = _scored(engine, max_tokens=3, prompt_logprobs=0)
        assert [e.logprob for e in prompt.scored] == pytest.approx([e.logprob for e in fresh.scored], abs=0.05)
    finally:
        cached.close()


def test_the_answer_after_a_scored_prompt_is_the_unscored_answer(engine):
    _, _, events = _scored(engine, max_tokens=12, prompt_logprobs=2, ignore_eos=True)
    text, _ = complete(engine, SCORED, temperature=0, max_tokens=12, ignore_eos=True)
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == text
    assert events[-1].usage.completion_tokens == 12
