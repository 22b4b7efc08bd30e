"""The hLimit token bucket, on real Redis and on fakeredis (with Lua)."""

from __future__ import annotations

import threading
import time

import pytest
import redis
from redis.crc import key_slot

from shared import keys
from shared.ratelimit import Decision, TokenBucket

HOUR = 3600.0
SID = "ratelimit-test"


def _written(client: redis.Redis) -> list[bytes]:
    return sorted(client.scan_iter(match=f"{keys.NS}:{{{SID}}}:*"))


def _allowed(decisions: list[Decision]) -> list[bool]:
    return [d.allowed for d in decisions]


def test_a_new_bucket_is_full(any_redis: redis.Redis) -> None:
    """A bucket never used (or expired) holds its whole capacity and needs no reset."""
    decision = TokenBucket(any_redis, HOUR).peek(SID, 7)

    full = Decision(allowed=True, remaining=7, limit=7, retry_after=0.0, reset_after=0.0)
    assert full == decision


def test_refill_stops_at_capacity(any_redis: redis.Redis) -> None:
    """Refill fills a drained bucket back to its capacity and never beyond it."""
    bucket = TokenBucket(any_redis, 0.2)
    bucket.take(SID, 2)
    bucket.take(SID, 2)

    time.sleep(0.5)  # 2.5 periods: 5 tokens' worth of refill
    decision = bucket.peek(SID, 2)

    assert (True, 2, 0.0) == (decision.allowed, decision.remaining, decision.reset_after)


def test_drain_refuses_with_retry_after_one_token_time(any_redis: redis.Redis) -> None:
    """Capacity 5 allows 5 takes; the 6th is refused with retry_after about P/C."""
    bucket = TokenBucket(any_redis, HOUR)

    decisions = [bucket.take(SID, 5) for _ in range(6)]

    assert [True] * 5 + [False] == _allowed(decisions)
    assert [4, 3, 2, 1, 0, 0] == [d.remaining for d in decisions]
    assert [0.0] * 5 == [d.retry_after for d in decisions[:5]]
    assert HOUR / 5 == pytest.approx(decisions[5].retry_after, abs=1.0)
    assert HOUR == pytest.approx(decisions[5].reset_after, abs=1.0)


def test_partial_refill_gives_whole_tokens_only(any_redis: redis.Redis) -> None:
    """1.2 tokens' worth of refill allows one take, and the next waits for the rest."""
    bucket = TokenBucket(any_redis, 2.0)  # capacity 2 per 2 s: one token per second
    bucket.take(SID, 2)
    bucket.take(SID, 2)

    time.sleep(1.2)
    decisions = [bucket.take(SID, 2), bucket.take(SID, 2)]

    assert [True, False] == _allowed(decisions)
    assert 0.8 == pytest.approx(decisions[1].retry_after, abs=0.15)


def test_smaller_capacity_clamps_at_once(any_redis: redis.Redis) -> None:
    """A full bucket of 10 seen with capacity 3 holds 3: the 4th take is refused."""
    bucket = TokenBucket(any_redis, HOUR)
    bucket.take(SID, 10)

    decisions = [bucket.take(SID, 3) for _ in range(4)]

    assert [True, True, True, False] == _allowed(decisions)
    assert [2, 1, 0, 0] == [d.remaining for d in decisions]
    assert [3, 3, 3, 3] == [d.limit for d in decisions]


def test_larger_capacity_keeps_tokens_and_refills_at_new_rate(any_redis: redis.Redis) -> None:
    """An empty bucket of 3 seen with capacity 6 stays empty and waits P/6, not P/3."""
    bucket = TokenBucket(any_redis, HOUR)
    for _ in range(3):
        bucket.take(SID, 3)

    decision = bucket.take(SID, 6)

    assert (False, 0, 6) == (decision.allowed, decision.remaining, decision.limit)
    assert HOUR / 6 == pytest.approx(decision.retry_after, abs=1.0)


def test_request_limit_tightens_and_solution_pays_only_allowed(any_redis: redis.Redis) -> None:
    """Request hLimit 2 under solution 100: 2 of 4 takes pass; the solution loses exactly 2."""
    bucket = TokenBucket(any_redis, HOUR)

    decisions = [bucket.take(SID, 100, request_capacity=2) for _ in range(4)]

    assert [True, True, False, False] == _allowed(decisions)
    assert [2, 2, 2, 2] == [d.limit for d in decisions]
    assert 98 == bucket.peek(SID, 100).remaining


def test_request_limit_at_or_above_solution_names_no_bucket(any_redis: redis.Redis) -> None:
    """A request hLimit that cannot tighten is ignored: no request bucket is written."""
    bucket = TokenBucket(any_redis, HOUR)

    decision = bucket.take(SID, 5, request_capacity=5)

    assert (True, 4, 5) == (decision.allowed, decision.remaining, decision.limit)
    assert 0 == any_redis.exists(keys.request_bucket(SID, 5))


def test_both_or_neither(any_redis: redis.Redis) -> None:
    """An empty solution bucket refuses the take and the request bucket keeps its token."""
    bucket = TokenBucket(any_redis, HOUR)
    bucket.take(SID, 3, request_capacity=2)  # solution 2 left, request 1 left
    bucket.take(SID, 3)
    bucket.take(SID, 3)  # solution empty

    decision = bucket.take(SID, 3, request_capacity=2)

    assert False is decision.allowed
    assert b"1" == any_redis.hget(keys.request_bucket(SID, 2), "tokens")


@pytest.mark.parametrize(("capacity", "request_capacity"), [(0, None), (10, 0), (0, 0)])
def test_capacity_zero_is_never(
    any_redis: redis.Redis, capacity: int, request_capacity: int | None
) -> None:
    """hLimit 0 (solution's or request's) refuses at once with retry_after None, writing nothing."""
    bucket = TokenBucket(any_redis, HOUR)

    took = bucket.take(SID, capacity, request_capacity)
    peeked = bucket.peek(SID, capacity, request_capacity)

    never = Decision(allowed=False, remaining=0, limit=0, retry_after=None, reset_after=0.0)
    assert [never, never] == [took, peeked]
    assert [] == _written(any_redis)


def test_capacity_zero_refuses_a_message_that_already_paid(any_redis: redis.Redis) -> None:
    """hLimit 0 stops sending: even a retried message with its token taken is refused."""
    bucket = TokenBucket(any_redis, HOUR)
    ledger = keys.ledger(SID, "task-1")
    bucket.take(SID, 5, once_key=ledger)

    assert None is bucket.take(SID, 0, once_key=ledger).retry_after


def test_take_once_per_ledger(any_redis: redis.Redis) -> None:
    """A second take with the same once_key is allowed and takes nothing, even when empty."""
    bucket = TokenBucket(any_redis, HOUR)
    ledger = keys.ledger(SID, "task-1")

    first = bucket.take(SID, 2, request_capacity=1, once_key=ledger)
    again = [bucket.take(SID, 2, request_capacity=1, once_key=ledger) for _ in range(3)]
    other = bucket.take(SID, 2, request_capacity=1, once_key=keys.ledger(SID, "task-2"))

    assert [True, True, True, True, False] == _allowed([first, *again, other])
    assert 1 == bucket.peek(SID, 2).remaining
    assert b"1" == any_redis.hget(ledger, "token")
    assert -1 == any_redis.ttl(ledger)
    assert 0 == any_redis.exists(keys.ledger(SID, "task-2"))


def test_peek_takes_nothing(any_redis: redis.Redis) -> None:
    """Peeking repeats the same answer and writes no key; on an empty bucket it says when."""
    bucket = TokenBucket(any_redis, HOUR)

    peeks = [bucket.peek(SID, 3, request_capacity=1) for _ in range(3)]
    written = _written(any_redis)
    bucket.take(SID, 3, request_capacity=1)
    empty = bucket.peek(SID, 3, request_capacity=1)

    assert [True] * 3 == _allowed(peeks)
    assert [1, 1, 1] == [d.remaining for d in peeks]
    assert [] == written
    assert (False, 0, 1) == (empty.allowed, empty.remaining, empty.limit)
    assert HOUR == pytest.approx(empty.retry_after, abs=1.0)
    assert 2 == bucket.peek(SID, 3).remaining


def test_keys_share_hash_tag_and_expire_when_full(any_redis: redis.Redis) -> None:
    """Every key of a take hashes to the solution's slot; buckets expire about when full."""
    bucket = TokenBucket(any_redis, HOUR)
    ledger = keys.ledger(SID, "task-1")
    bucket.take(SID, 4, request_capacity=2, once_key=ledger)

    solution_key, request_key = keys.bucket(SID), keys.request_bucket(SID, 2)
    slots = {key_slot(k.encode()) for k in (solution_key, request_key, ledger)}
    assert 1 == len(slots)
    assert {f"{{{SID}}}"} == {k[k.index("{") : k.index("}") + 1] for k in (solution_key, ledger)}
    # one token of 4 refills in P/4; one of 2 in P/2 (plus a second of slack)
    assert HOUR / 4 + 1 == pytest.approx(any_redis.pttl(solution_key) / 1000, abs=1.0)
    assert HOUR / 2 + 1 == pytest.approx(any_redis.pttl(request_key) / 1000, abs=1.0)


def test_concurrent_takes_never_exceed_capacity(real_redis: redis.Redis) -> None:
    """8 threads x 50 takes against capacity 50 (long period): exactly 50 are allowed."""
    bucket = TokenBucket(real_redis, HOUR)
    results: list[bool] = []
    lock = threading.Lock()
    start = threading.Barrier(8)

    def worker() -> None:
        start.wait()
        mine = [bucket.take(SID, 50).allowed for _ in range(50)]
        with lock:
            results.extend(mine)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert (400, 50) == (len(results), sum(results))


def test_invalid_arguments_are_refused(fake_redis: redis.Redis) -> None:
    """Negative capacities, a bad period and a ledger key of another solution raise ValueError."""
    bucket = TokenBucket(fake_redis, HOUR)
    with pytest.raises(ValueError):
        bucket.take(SID, -1)
    with pytest.raises(ValueError):
        bucket.peek(SID, 5, request_capacity=-1)
    with pytest.raises(ValueError):
        bucket.take(SID, 5, once_key=keys.ledger("other", "task-1"))
    with pytest.raises(ValueError):
        TokenBucket(fake_redis, 0)
