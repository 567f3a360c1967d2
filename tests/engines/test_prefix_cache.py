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


def test_an_engine_short_of_cells_drops_the_oldest_entry_first():
    cache = index(holders=3)
    a = cache.store([1, 1])
    b = cache.store([2, 2])
    cache.longest_match([1, 1])  # a is used again: b is the oldest
    assert cache.evict_oldest() == b.holder
    assert cache.evict_oldest() == a.holder
    assert cache.evict_oldest() is None and cache.cached_tokens == 0 and len(cache.holders) == 3
