"""The prefix cache's host-memory tier as bookkeeping: longest match, one copy per start, LRU in bytes."""

from __future__ import annotations

from tokenmill.engines.host_cache import HostTier
from tokenmill.engines.prefix_cache import PrefixIndex, distinct_tokens, shared_length


def test_shared_length_agrees_with_a_plain_scan():
    def scan(a, b):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return n

    base = list(range(300))
    for cut in (0, 1, 2, 63, 64, 65, 150, 299):
        other = base[:cut] + [-1] + base[cut + 1 :]
        assert shared_length(base, other) == scan(base, other) == cut
    assert shared_length(base, base[:10]) == 10 and shared_length([], base) == 0


def test_a_start_shared_by_several_prompts_counts_once():
    system = list(range(100))
    prompts = [system + [1, 2], system + [3], system + [1, 9, 9], list(range(500, 505))]
    # 100 shared, then [1] shared by two: 100 + 1 + (1) + 1 + (2) + 5
    assert distinct_tokens(prompts) == 100 + 1 + 1 + 1 + 2 + 5
    index = PrefixIndex(holders=list(range(8)), budget_tokens=130)
    for prompt in prompts:
        index.store(prompt)
    assert index.cached_tokens == 110 and len(index.entries) == 4  # all of them fit 130 cells


def test_a_new_entry_is_built_on_the_entry_it_shares_its_start_with():
    index = PrefixIndex(holders=list(range(8)), budget_tokens=1000)
    first = index.store(list(range(50)) + [1])
    second = index.store(list(range(50)) + [2, 3])
    assert first is not None and second is not None
    assert (second.source, second.start, second.end) == (first.holder, 50, 52)


def test_dropped_entries_are_offered_to_the_next_tier_before_their_holder_is_freed():
    offered = []
    index = PrefixIndex(holders=list(range(2)), budget_tokens=1000)
    index.evicting = lambda entry: offered.append((entry.holder, list(entry.tokens)))
    a = index.store([1, 1])
    index.store([2, 2])
    index.store([3, 3])  # no holder free: the oldest goes
    assert a is not None and offered == [(a.holder, [1, 1])]


def test_the_longest_copy_is_found_and_a_copy_it_extends_is_replaced():
    host = HostTier(budget_bytes=1000)
    system = list(range(100, 148))  # three blocks
    short = host.keep(system, 30)
    longer = host.keep(system + list(range(20)), 50)
    assert longer.dropped == (short.key,)  # the longer copy holds all the shorter one did
    other = host.keep(list(range(500, 540)), 20)
    copy, shared = host.longest_match(system + list(range(17)) + [-1])
    assert copy is not None and copy.key == longer.key and shared == 48 + 17  # exact, past the last whole block
    assert host.covers(system + list(range(5))) and not host.covers(system + list(range(30)))
    assert host.longest_match(list(range(500, 510))) == (None, 0)  # under one block: not looked for
    assert (host.used_bytes, host.used_tokens, sorted(host.copies)) == (70, 108, sorted([longer.key, other.key]))


def blockful(n: int) -> list[int]:
    return [n] * 16


def test_least_recently_used_copies_go_when_the_bytes_run_out():
    host = HostTier(budget_bytes=100)
    a = host.keep(blockful(1), 40)
    b = host.keep(blockful(2), 40)
    host.longest_match(blockful(1))  # a is used again: b is the oldest
    c = host.keep(blockful(3), 40)
    assert c.dropped == (b.key,) and host.evictions == 1
    assert sorted(host.copies) == sorted([a.key, c.key])
    assert host.keep(blockful(4), 101).key is None  # larger than the whole budget: not kept
    for i in range(200):
        host.keep(blockful(i) + [i] * (i % 20), 1 + i % 37)
        assert host.used_bytes == sum(copy.nbytes for copy in host.copies.values()) <= 100
    for key in list(host.copies):
        host.forget(key)
    assert (host.used_bytes, host.used_tokens, host._by_start) == (0, 0, {})  # nothing left behind


def test_a_peek_is_not_a_use():
    host = HostTier(budget_bytes=80)
    a = host.keep(blockful(1), 40)
    host.keep(blockful(2), 40)
    host.longest_match(blockful(1), touch=False)  # the scheduler asking: a stays the oldest
    assert host.keep(blockful(3), 40).dropped == (a.key,)


def test_a_lookup_among_thousands_of_copies_probes_blocks_not_copies():
    host = HostTier(budget_bytes=1 << 40)
    system = list(range(1000, 1960))  # a 960-token system prompt, then each conversation its own
    for n in range(3000):
        host.keep(system + [n] * 40, 1)
    copy, shared = host.longest_match(system + [1234] * 40 + [7])
    assert copy is not None and copy.tokens[-1] == 1234 and shared == 1000
