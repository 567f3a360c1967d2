"""Traffic control between API keys: the key file, quotas, fair share, priorities, push-out and
deadline-aware refusal, first as plain objects, then over HTTP."""

from __future__ import annotations

import asyncio
import math

import pytest

from tests.conftest import asgi_client, sim_settings
from tests.server.test_admission import Clock
from tokenmill.errors import Overloaded, QuotaExceeded
from tokenmill.server.admission import Admission, Ticket
from tokenmill.tenants import OTHER, Quotas, Tenant, parse_keys


def test_the_key_file_names_tenants_and_their_allowances():
    tenants = parse_keys(
        [
            "sk-a name=team-a weight=3 tokens_per_minute=600 requests_per_minute=10 max_priority=5",
            "  # a comment line",
            "sk-b name=team-b   # trailing comment",
            "sk-bare",
            "",
        ]
    )
    assert set(tenants) == {"sk-a", "sk-b", "sk-bare"}
    a = tenants["sk-a"]
    assert (a.group, a.label, a.weight, a.tokens_per_minute, a.requests_per_minute, a.max_priority) == (
        "team-a",
        "team-a",
        3.0,
        600,
        10,
        5,
    )
    assert tenants["sk-b"].weight == 1.0 and tenants["sk-b"].tokens_per_minute is None
    bare = tenants["sk-bare"]
    assert bare.label == OTHER and bare.group not in ("team-a", "team-b")  # its own group, labelled "other"
    assert a.priority(9) == 5 and a.priority(None) == 0 and bare.priority(3) == 0


@pytest.mark.parametrize(
    "line", ["sk weight=0", "sk weight=-1", "sk colour=red", "sk tokens_per_minute=0", "sk name", "sk weight=x"]
)
def test_a_bad_key_file_line_is_refused_with_its_line_number(line):
    with pytest.raises(ValueError, match="line 1"):
        parse_keys([line])


def test_the_request_quota_refills_and_says_when():
    clock = Clock()
    quotas, tenant = Quotas(clock), Tenant("t", "t", requests_per_minute=2)
    for _ in range(2):
        quotas.check(tenant)
        quotas.charge_request(tenant)
    with pytest.raises(QuotaExceeded) as refused:
        quotas.check(tenant)
    assert refused.value.code == "requests_per_minute_exceeded"
    assert refused.value.retry_after == pytest.approx(30.0)  # one request's worth refills in 60 / 2 s
    clock.now += 29.0
    with pytest.raises(QuotaExceeded):
        quotas.check(tenant)
    clock.now += 1.0
    quotas.check(tenant)  # the retry after Retry-After succeeds


def test_the_token_quota_counts_finished_requests_tokens():
    clock = Clock()
    quotas, tenant = Quotas(clock), Tenant("t", "t", tokens_per_minute=600)
    quotas.check(tenant)
    quotas.charge_tokens(tenant, 900)  # a request's prompt and answer, known when it ends: 300 over
    with pytest.raises(QuotaExceeded) as refused:
        quotas.check(tenant)
    assert refused.value.code == "tokens_per_minute_exceeded"
    assert refused.value.retry_after == pytest.approx(30.1)  # 301 tokens at 10 a second
    clock.now += math.ceil(refused.value.retry_after)  # what the Retry-After header says
    quotas.check(tenant)
    other = Tenant("u", "u", tokens_per_minute=600)
    quotas.check(other)  # buckets are per tenant


A, B = Tenant("a", "a"), Tenant("b", "b")


async def settle() -> None:
    """Let a granted waiter's task see its place (a few loop turns: shield, wait_for, the task)."""
    for _ in range(5):
        await asyncio.sleep(0)


async def _end(waiters: list[asyncio.Future[Ticket]]) -> None:
    """Release the places of the waiters admitted, and give up on the others."""
    for waiter in waiters:
        if waiter.done():
            waiter.result().release()
        else:
            waiter.cancel()
    await settle()


async def _queue(admission: Admission, tenant: Tenant, count: int, **kwargs) -> list[asyncio.Future[Ticket]]:
    waiters = [asyncio.ensure_future(admission.acquire(tenant=tenant, **kwargs)) for _ in range(count)]
    await settle()
    return waiters


async def test_a_freed_place_goes_to_the_tenant_holding_the_least_not_the_oldest_waiter():
    admission = Admission(capacity=2, max_queue=8, queue_timeout=5)
    held = [await admission.acquire(tenant=A) for _ in range(2)]
    flood = await _queue(admission, A, 3)
    steady = await _queue(admission, B, 1)
    held[0].release()
    await settle()
    assert steady[0].done() and not any(w.done() for w in flood)  # B first, though A's waiters are older
    assert admission.held_by("b") == 1 and admission.held_by("a") == 1
    held[1].release()
    await settle()
    assert flood[0].done() and not flood[1].done()  # within a tenant: first come, first served
    for waiter in flood[1:]:
        waiter.cancel()
    for ticket in (steady[0].result(), flood[0].result()):
        ticket.release()
    await settle()
    assert admission.active == 0 and admission.held_by("a") == 0


async def test_weights_share_the_places_of_two_saturating_tenants_three_to_one():
    heavy, light = Tenant("heavy", "heavy", weight=3), Tenant("light", "light", weight=1)
    admission = Admission(capacity=4, max_queue=128, queue_timeout=60)
    waiters = await _queue(admission, heavy, 60) + await _queue(admission, light, 60)
    admitted = {"heavy": 0, "light": 0}
    running: list[Ticket] = []
    for _ in range(40):  # both always have waiters: release the oldest running place, see who gets it
        await settle()
        for waiter in waiters:
            if waiter.done() and waiter.result() not in running and not getattr(waiter, "counted", False):
                running.append(waiter.result())
                admitted[waiter.result().tenant.group] += 1
                waiter.counted = True  # type: ignore[attr-defined]
        running.pop(0).release()
    assert admitted["heavy"] / admitted["light"] == pytest.approx(3.0, rel=0.1), admitted
    for waiter in waiters:
        waiter.cancel()


async def test_a_flood_leaves_headroom_for_a_tenant_seen_lately_and_fills_the_server_once_it_is_gone():
    clock = Clock()
    admission = Admission(capacity=4, max_queue=16, queue_timeout=60, clock=clock)
    (await admission.acquire(tenant=B)).release()  # B is seen: one place at a time
    flood = await _queue(admission, A, 6)
    # kept for B: up to its share (2 of 4), as twice its peak (one place) plus one would need
    assert admission.held_by("a") == 2 and admission.queued == 4
    steady = await asyncio.wait_for(admission.acquire(tenant=B), 0.1)  # no wait for A's places to free
    assert admission.held_by("b") == 1
    steady.release()
    clock.now += 11  # B has not asked for longer than the window: its share is lent again
    await _queue(admission, A, 1)
    assert admission.held_by("a") == 4
    await _end(flood)


async def test_headroom_remembers_a_steady_tenants_burst_while_it_keeps_asking():
    """A steady tenant's burst (three requests at once) is remembered for a minute while it keeps
    asking one at a time: its next burst finds the places kept (twice the peak plus one, within its
    share), not the three that one place at a time would keep."""
    clock = Clock()
    admission = Admission(capacity=16, max_queue=32, queue_timeout=60, clock=clock)
    burst = [await admission.acquire(tenant=B) for _ in range(3)]
    for ticket in burst:
        ticket.release()
    for _ in range(30):  # 30 s of one request at a time
        clock.now += 1
        (await admission.acquire(tenant=B)).release()
    flood = await _queue(admission, A, 20)
    assert admission.held_by("a") == 16 - 7  # kept for B: 2 x 3 + 1, within its share of 8
    await _end(flood)


async def test_a_named_tenant_has_a_place_kept_for_its_first_request_beside_a_flood():
    """Before the admission has seen B at all, a flood from A must not take every place: B's first
    request would wait for a whole request's length. Each named tenant has one place kept, a
    quarter of the capacity at most, and unnamed keys none."""
    c, d = Tenant("c", "c"), Tenant("d", "d")
    unnamed = Tenant("key-9", OTHER)
    admission = Admission(capacity=8, max_queue=16, queue_timeout=60, named=[A, B, c, d, unnamed])
    flood = await _queue(admission, A, 12)
    assert admission.held_by("a") == 6  # B, c and d would keep 3: capped at 8 // 4
    first = await asyncio.wait_for(admission.acquire(tenant=B), 0.1)
    assert admission.held_by("b") == 1 and not first.queued  # at once: the scheduler may treat B as light
    first.release()
    await _end(flood)
    alone = Admission(capacity=4, max_queue=16, queue_timeout=60, named=[A, unnamed])
    tickets = [await asyncio.wait_for(alone.acquire(tenant=A), 0.1) for _ in range(4)]  # nothing kept
    for ticket in tickets:
        ticket.release()


async def test_a_ticket_says_whether_its_request_waited_for_its_place():
    """The scheduler treats a tenant as light only while its requests get places at once."""
    admission = Admission(capacity=1, max_queue=4, queue_timeout=5)
    first = await admission.acquire(tenant=A)
    second = asyncio.ensure_future(admission.acquire(tenant=A))
    await settle()
    first.release()
    assert not first.queued and (await second).queued
    (await second).release()


async def test_higher_priority_is_admitted_first():
    admission = Admission(capacity=1, max_queue=8, queue_timeout=5)
    holder = await admission.acquire(tenant=A)
    low = await _queue(admission, B, 1)
    high = await _queue(admission, A, 1, priority=2)
    holder.release()
    await settle()
    assert high[0].done() and not low[0].done()  # though A holds more and B came first
    low[0].cancel()
    high[0].result().release()


async def test_a_full_queue_pushes_out_the_flooding_tenants_newest_waiter_for_another_tenant():
    admission = Admission(capacity=2, max_queue=2, queue_timeout=5)
    held = [await admission.acquire(tenant=A) for _ in range(2)]
    flood = await _queue(admission, A, 2)
    with pytest.raises(Overloaded):  # A itself gets no further: it is the one over its share
        await admission.acquire(tenant=A)
    steady = await _queue(admission, B, 1)
    with pytest.raises(Overloaded) as pushed:
        await flood[1]
    assert pushed.value.code == "over_fair_share" and pushed.value.retry_after >= 1
    assert not flood[0].done() and not steady[0].done() and admission.queued == 2
    held[0].release()
    await settle()
    assert steady[0].done() and not flood[0].done()  # B holds nothing, A one place
    flood[0].cancel()
    for ticket in (held[1], steady[0].result()):
        ticket.release()
    await settle()  # the cancelled waiter may have been granted the place first: it gives it back
    assert admission.active == 0


async def test_a_request_that_cannot_get_a_place_before_its_deadline_is_refused_at_once():
    clock = Clock()
    admission = Admission(capacity=1, max_queue=64, queue_timeout=30, clock=clock)
    for _ in range(10):  # one place freed a second
        (await admission.acquire()).release()
        clock.now += 1.0
    holder = await admission.acquire()
    ahead = await _queue(admission, A, 5)
    assert admission.predicted_wait(1, A) == pytest.approx(6.0)  # 5 ahead and itself, at 1 a second
    assert admission.predicted_wait(1, B) == pytest.approx(1.0)  # B holds nothing: it goes first
    with pytest.raises(Overloaded) as refused:
        await admission.acquire(tenant=A, max_wait=4.0)
    assert refused.value.code == "queue_wait_too_long" and refused.value.retry_after == pytest.approx(6.0)
    assert admission.queued == 5  # refused without queueing
    fits = await _queue(admission, A, 1, max_wait=10.0)
    assert admission.queued == 6 and not fits[0].done()
    for waiter in ahead + fits:
        waiter.cancel()
    holder.release()


async def test_a_wait_is_not_predicted_from_the_first_few_releases_of_a_run():
    """At start-up the first release or two make a rate of almost nothing (one place in a second):
    refusing on it sent a saturating tenant's closed-loop clients into a storm of instant retries
    (8,392 refusals in 90 s, Retry-After 383 s, where it later waited 15 s). A few releases are
    no rate: the request queues, bounded by --queue-timeout."""
    from tokenmill.server.admission import MIN_RELEASES_FOR_A_RATE

    clock = Clock()
    admission = Admission(capacity=1, max_queue=64, queue_timeout=30, clock=clock)
    (await admission.acquire()).release()  # one release: "1 a second"
    clock.now += 1.0
    holder = await admission.acquire()
    ahead = await _queue(admission, A, 40)  # 41 s at that rate, past the 30 s budget
    assert admission.predicted_wait(1, A) is None
    fits = await _queue(admission, A, 1)
    assert not fits[0].done() and admission.queued == 41  # queued, not refused
    assert MIN_RELEASES_FOR_A_RATE <= 10  # the test above refuses on ten releases' rate
    for waiter in ahead + fits:
        waiter.cancel()
    holder.release()


KEYS = "sk-quota name=metered tokens_per_minute=40\nsk-free name=free\nsk-bare\n"


async def test_over_quota_is_a_429_with_retry_after_and_other_keys_are_untouched(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text(KEYS)
    async with asgi_client(sim_settings(api_key_file=str(keys))) as client:

        def ask(key: str):
            body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 40, "ignore_eos": True}
            return client.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})

        first = await ask("sk-quota")
        assert first.status_code == 200  # within quota; its tokens take the bucket below zero
        over = await ask("sk-quota")
        assert over.status_code == 429
        assert over.json()["error"]["code"] == "tokens_per_minute_exceeded"
        assert over.json()["error"]["type"] == "rate_limit_error"
        assert int(over.headers["Retry-After"]) >= 1
        for _ in range(3):
            assert (await ask("sk-free")).status_code == 200
        assert (await ask("sk-bare")).status_code == 200
        metrics = (await client.get("/metrics")).text
    assert 'tokenmill_tenant_refused_total{reason="tokens_per_minute_exceeded",tenant="metered"} 1.0' in metrics
    assert 'tokenmill_tenant_admitted_total{tenant="free"} 3.0' in metrics
    assert 'tokenmill_tenant_admitted_total{tenant="other"} 1.0' in metrics  # the unnamed key
    assert 'tokenmill_tenant_tokens_total{kind="generated",tenant="metered"} 40.0' in metrics
    assert 'tokenmill_rejections_total{reason="overloaded"}' not in metrics  # a quota is not an overload


async def test_embeddings_count_in_the_callers_share_and_token_quota(tmp_path):
    """An embeddings batch is the caller's work like a generation: its prompt tokens go to its
    tenant's metrics and bucket, and a key over its token quota is refused embeddings too."""
    keys = tmp_path / "keys"
    keys.write_text(KEYS)
    async with asgi_client(sim_settings(api_key_file=str(keys))) as client:

        def embed(key: str):
            body = {"input": ["tokens and queues " * 8] * 4}
            return client.post("/v1/embeddings", json=body, headers={"Authorization": f"Bearer {key}"})

        first = await embed("sk-quota")
        assert first.status_code == 200 and first.json()["usage"]["prompt_tokens"] > 40
        over = await embed("sk-quota")  # the first batch took the 40-token bucket below zero
        assert over.status_code == 429 and over.json()["error"]["code"] == "tokens_per_minute_exceeded"
        assert (await embed("sk-free")).status_code == 200
        metrics = (await client.get("/metrics")).text
    assert 'tokenmill_tenant_admitted_total{tenant="metered"} 1.0' in metrics
    assert 'tokenmill_tenant_admitted_total{tenant="free"} 1.0' in metrics
    assert 'tokenmill_tenant_tokens_total{kind="prompt",tenant="metered"}' in metrics


async def test_priority_comes_from_the_body_or_the_x_priority_header():
    async with asgi_client(sim_settings()) as client:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        assert (await client.post("/v1/chat/completions", json={**body, "priority": 3})).status_code == 200
        assert (await client.post("/v1/chat/completions", json=body, headers={"X-Priority": "2"})).status_code == 200
        bad = await client.post("/v1/chat/completions", json=body, headers={"X-Priority": "high"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "priority"
        assert (await client.post("/v1/chat/completions", json={**body, "priority": 10**6})).status_code == 400


def test_a_bad_key_file_stops_the_settings_with_the_line_named(tmp_path):
    from pydantic import ValidationError

    from tokenmill.config import Settings

    keys = tmp_path / "keys"
    keys.write_text("sk-good name=a\nsk-bad weight=0\n")
    with pytest.raises(ValidationError, match="key file line 2: weight must be positive"):
        Settings(engine="simulated", api_key_file=str(keys))
    with pytest.raises(ValidationError, match="api-key-file"):
        Settings(engine="simulated", api_key_file=str(tmp_path / "missing"))
