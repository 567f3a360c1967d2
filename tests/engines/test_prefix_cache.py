"""The prefix cache's bookkeeping: longest match, growth of a conversation, LRU within the budget."""

from __future__ import annotations

from tokenmill.engines.prefix_cache import PrefixIndex, Store


def index(holders: int = 3, budget: int = 100) -> PrefixIndex:
    return PrefixIndex(holders=list(range(holders)), budget_tokens=budget)


def test_the_longest_shared_start_wins():
    cache = index()
    cache.store([1, 2, 3, 4])
    cache.store([1, 2, 9, 9, 9])
    entry, shared = cache.longest_match([1, 2, 3, 7])
    assert entry is not None and entry.tokens == [1, 2, 3, 4] and shared == 3
    assert cache.longest_match([5, 6]) == (None, 0)


def test_a_conversations_next_turn_grows_its_entry_in_place():
    cache = index()
    first = cache.store([1, 2, 3])
    assert first == Store(holder=first.holder, start=0, end=3)
    grown = cache.store([1, 2, 3, 4, 5])  # turn 2 resends turn 1 and adds to it
    assert grown == Store(holder=first.holder, start=3, end=5)
    assert [e.tokens for e in cache.entries] == [[1, 2, 3, 4, 5]]
    assert cache.store([1, 2]) is None  # already held as the start of a longer prompt


def test_least_recently_used_entries_go_first_when_the_budget_is_full():
    cache = index(holders=4, budget=10)
    a = cache.store([1] * 4)
    b = cache.store([2] * 4)
    cache.longest_match([1, 1])  # a is used again: b is now the oldest
    c = cache.store([3] * 4)
    assert c.evicted == (b.holder,)
    assert sorted(e.holder for e in cache.entries) == sorted([a.holder, c.holder])
    assert cache.cached_tokens <= 10


def test_holders_run_out_before_the_budget_does():
    cache = index(holders=2, budget=1000)
    a = cache.store([1])
    cache.store([2])
    c = cache.store([3])
    assert c.evicted == (a.holder,) and c.holder == a.holder  # the freed holder is reused


def test_a_prompt_longer_than_the_budget_is_not_cached():
    cache = index(budget=5)
    assert cache.store(list(range(6))) is None and cache.entries == []


def test_the_budget_holds_under_many_stores():
    cache = index(holders=8, budget=50)
    for i in range(1000):
        cache.store([i % 13] * (1 + i % 9) + [i])
        assert cache.cached_tokens <= 50
        assert len(cache.entries) + len(cache.holders) == 8  # no holder leaks


def test_reuse_leaves_the_last_prompt_token_to_compute_and_counts():
    cache = index()
    cache.store([1, 2, 3, 4])
    assert cache.reuse([1, 2, 3, 4]) == (cache.entries[0].holder, 3)  # the last token's logits are needed
    assert cache.reuse([9, 9]) is None
    stats = cache.stats()
    assert (stats.queried_tokens, stats.hit_tokens, stats.cached_tokens) == (6, 3, 4)


def test_a_reuse_the_engine_could_not_copy_counts_no_hit_and_drops_the_entry():
    cache = index()
    cache.store([1, 2, 3, 4])
    holder, shared = cache.reuse([1, 2, 3, 4])
    cache.lost(holder, shared)
    stats = cache.stats()
    assert (stats.queried_tokens, stats.hit_tokens, stats.cached_tokens) == (4, 0, 0)
    assert holder in cache.holders and cache.reuse([1, 2, 3, 4]) is None


def test_an_engine_short_of_cells_drops_the_oldest_entry_first():
    cache = index(holders=3)
    a = cache.store([1, 1])
    b = cache.store([2, 2])
    cache.longest_match([1, 1])  # a is used again: b is the oldest
    assert cache.evict_oldest() == b.holder
    assert cache.evict_oldest() == a.holder
    assert cache.evict_oldest() is None and cache.cached_tokens == 0 and len(cache.holders) == 3


def _single_turn_answers(cache: PrefixIndex, count: int, start: int = 0) -> list[Store | None]:
    """`count` distinct prompts, each answered and never resent: what a single-turn load leaves."""
    stores = []
    for i in range(start, start + count):
        prompt = [1000 + i, 7, 7]
        cache.store(prompt)  # after prefill
        stores.append(cache.store([*prompt, 5, 5, 5], answer_from=len(prompt)))  # when it finishes
    return stores


def test_answers_nobody_resends_stop_being_cached_but_one_in_a_few_still_is():
    from tokenmill.engines.prefix_cache import ANSWER_PROBE, ANSWER_WORTH

    cache = index(holders=4, budget=1000)
    first = _single_turn_answers(cache, 4)
    assert all(store is not None for store in first)  # nothing known yet (none evicted): cached
    later = _single_turn_answers(cache, 8 * ANSWER_PROBE, start=100)
    cached = sum(store is not None for store in later)
    # each answer evicted unused says so: the share resent is below 1 in ANSWER_WORTH from then on
    assert ANSWER_WORTH > 1 and cached == 8
    assert cache.stats().answers_skipped == len(later) - cached
    assert all(entry.answer_from is None for entry in cache.entries[:-1])  # prompts stay cached


def test_answers_a_next_turn_resends_are_always_cached():
    cache = index(holders=4, budget=10_000)
    history = [1, 2, 3]
    for turn in range(40):
        assert cache.reuse([*history, 9]) is not None or turn == 0
        cache.store(history)  # the prompt, after prefill (grown from the last turn's entry)
        answer = [50 + turn, 51 + turn]
        assert cache.store([*history, *answer], answer_from=len(history)) is not None, turn
        history = [*history, *answer, 60 + turn]  # the next turn resends the answer
        _single_turn_answers(cache, 1, start=turn)  # one-off requests besides the conversation
    assert cache.stats().answers_skipped == 0


def test_an_answer_resent_only_in_part_counts_as_resent():
    """A client that trims or edits the last answer before its next turn still reused some of it
    (the cached prompt is not grown then: the next one diverges inside the answer)."""
    cache = index(holders=4, budget=10_000)
    for turn in range(40):
        prompt = [1000 + turn, 7]
        cache.store(prompt)
        assert cache.store([*prompt, 5, 6, 7], answer_from=len(prompt)) is not None, turn
        assert cache.reuse([*prompt, 5, 9, 9]) is not None  # the answer's first token kept, then edited
        _single_turn_answers(cache, 1, start=turn)


def test_a_workload_turning_conversational_gets_its_answers_cached_again():
    cache = index(holders=4, budget=100_000)
    _single_turn_answers(cache, 2000)  # older outcomes fade: this many must not outweigh what follows
    assert cache.stats().answers_skipped > 0
    history = [1, 2, 3]
    cached = []
    for turn in range(150):
        cache.reuse([*history, 9])
        cache.store(history)
        answer = [50 + turn, 51 + turn]
        cached.append(cache.store([*history, *answer], answer_from=len(history)) is not None)
        history = [*history, *answer, 60 + turn]
    assert all(cached[-20:])  # probes found their answers resent, and caching came back


def test_a_prompt_sent_again_without_its_answer_shrinks_its_entry_back_to_the_prompt():
    """A single-turn app repeats its prompts: each hit uses an answered entry's prompt, so LRU would
    keep the answer's cells forever. The repeat says the answer was not resent; the entry shrinks."""
    cache = index(holders=4, budget=1000)
    prompt = [1, 2, 3, 4]
    cache.store(prompt)
    grown = cache.store([*prompt, 8, 8], answer_from=len(prompt))
    assert grown is not None and cache.entries[0].tokens == [*prompt, 8, 8]
    assert cache.reuse(prompt) == (grown.holder, 3)  # the same prompt again
    assert cache.store(prompt) == Store(grown.holder, 4, 4)  # after its prefill: clear from 4 on
    assert [e.tokens for e in cache.entries] == [prompt] and cache.cached_tokens == 4
    # that outcome counts: with none resent, the next answers are mostly not cached
    skipped = [cache.store([*prompt, 9, i], answer_from=len(prompt)) is None for i in range(8)]
    assert sum(skipped) == 7


def test_while_answers_are_not_resent_a_prompt_keeps_one_entry_whatever_its_answers():
    """A single-turn flood sends each of a few prompts from many sequences at once: a probe's
    answer for a prompt whose entry already carries another answer replaces it, instead of taking
    a holder of its own and pushing out some other prompt (another key's, which then misses)."""
    cache = index(holders=3, budget=1000)
    prompts = [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]]
    for prompt in prompts:
        cache.store(prompt)
    prompt = prompts[0]
    cache.store([*prompt, 8, 8], answer_from=len(prompt))  # nothing known yet: cached
    cache.reuse(prompt)  # the prompt again, without that answer: answers are not resent here
    skipped = [cache.store([*prompt, 8, i], answer_from=len(prompt)) is None for i in range(30)]
    assert cache.stats().answers_skipped == sum(skipped) > 0  # not paying: only probes are cached
    assert sorted(e.tokens[:4] for e in cache.entries) == sorted(prompts)  # no other prompt pushed out
    entry = next(e for e in cache.entries if e.tokens[:4] == prompt)
    last = cache.store([*prompt, 7, 7], answer_from=len(prompt))
    while last is None:
        last = cache.store([*prompt, 7, 7], answer_from=len(prompt))
    assert last == Store(entry.holder, 4, 6) and entry.tokens == [*prompt, 7, 7]


def test_while_answers_are_resent_two_conversations_opening_alike_keep_both_answers():
    cache = index(holders=3, budget=1000)
    opening = [1, 2, 3]
    cache.store(opening)
    first = cache.store([*opening, 50, 51], answer_from=3)
    second = cache.store([*opening, 60, 61], answer_from=3)
    assert first is not None and second is not None and second.holder != first.holder
    assert sorted(e.tokens for e in cache.entries) == [[*opening, 50, 51], [*opening, 60, 61]]
