"""``Idempotency-Key`` claims: one task per key, and a replay only ever names a task the
broker took — on real Redis and on fakeredis."""

from __future__ import annotations

import threading
import time

import pytest
import redis

from postroom.api.intake.idempotency import Claim, IdempotencyStore
from postroom.shared.errors import Conflict

FIRST = Claim("body-hash", "task-1")
SECOND = Claim("body-hash", "task-2")


def test_the_first_claim_takes_the_key(any_redis: redis.Redis) -> None:
    """A free key is taken (``None``: go on and enqueue), and is pending until confirmed."""
    store = IdempotencyStore(any_redis)
    assert store.claim("acme", "k", FIRST) is None
    assert Claim("body-hash", "task-1", accepted=False) == store.peek("acme", "k")


def test_a_confirmed_claim_is_what_later_requests_get(any_redis: redis.Redis) -> None:
    """Once confirmed, a second claim and a lookup both answer the first task."""
    store = IdempotencyStore(any_redis)
    store.claim("acme", "k", FIRST)
    assert store.confirm("acme", "k", FIRST)
    confirmed = Claim("body-hash", "task-1", accepted=True)
    assert (confirmed, confirmed) == (store.claim("acme", "k", SECOND), store.get("acme", "k"))


def test_a_request_meeting_a_pending_claim_waits_for_its_confirmation(
    any_redis: redis.Redis,
) -> None:
    """While the first request is still enqueueing, the second waits and then answers the
    first request's task — never a task the broker might not have."""
    store = IdempotencyStore(any_redis)
    store.claim("acme", "k", FIRST)
    timer = threading.Timer(0.2, store.confirm, args=("acme", "k", FIRST))
    timer.start()
    try:
        assert Claim("body-hash", "task-1", accepted=True) == store.claim("acme", "k", SECOND)
    finally:
        timer.cancel()


def test_a_released_claim_lets_the_waiting_request_take_the_key(
    any_redis: redis.Redis,
) -> None:
    """The first request's enqueue failed (503) and it gave the key up: the waiting request
    takes the key itself."""
    store = IdempotencyStore(any_redis)
    store.claim("acme", "k", FIRST)
    timer = threading.Timer(0.2, store.release, args=("acme", "k", "task-1"))
    timer.start()
    try:
        assert store.claim("acme", "k", SECOND) is None
    finally:
        timer.cancel()
    assert Claim("body-hash", "task-2", accepted=False) == store.peek("acme", "k")


def test_a_claim_that_stays_pending_is_a_conflict(any_redis: redis.Redis) -> None:
    """A first request that neither confirms nor releases within the wait: 409."""
    store = IdempotencyStore(any_redis, settle_wait_s=0.2)
    store.claim("acme", "k", FIRST)
    started = time.monotonic()
    with pytest.raises(Conflict):
        store.get("acme", "k")
    assert time.monotonic() - started >= 0.2


def test_only_the_owner_confirms_or_releases(any_redis: redis.Redis) -> None:
    """Another task's id can neither confirm nor release a claim."""
    store = IdempotencyStore(any_redis)
    store.claim("acme", "k", FIRST)
    assert not store.confirm("acme", "k", SECOND)
    assert not store.release("acme", "k", "task-2")
    assert Claim("body-hash", "task-1", accepted=False) == store.peek("acme", "k")


def test_concurrent_claims_make_one_owner(real_redis: redis.Redis) -> None:
    """20 threads claim one key at once: exactly one takes it; once it confirms, every
    other gets its claim."""
    store = IdempotencyStore(real_redis)
    barrier = threading.Barrier(20)
    results: list[Claim | None] = []

    def claim(n: int) -> None:
        mine = Claim("body-hash", f"task-{n}")
        barrier.wait()
        earlier = store.claim("acme", "k", mine)
        if earlier is None:
            store.confirm("acme", "k", mine)
        results.append(earlier)

    threads = [threading.Thread(target=claim, args=(n,)) for n in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    owners = [r for r in results if r is None]
    assert 1 == len(owners)
    assert 1 == len({r.task_id for r in results if r is not None})
