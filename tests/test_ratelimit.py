"""The hLimit token bucket, on real Redis and on fakeredis (with Lua)."""

from __future__ import annotations

import threading
import time

import pytest
import redis
from redis.crc import key_slot

from postroom.shared import keys
from postroom.shared.ratelimit import Decision, TokenBucket

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


def test_smaller_capacity_takes_the_difference_away_at_once(any_redis: redis.Redis) -> None:
    """1 of 10 used, then capacity 3: 2 are left (3 - 1), the 3rd take is refused."""
    bucket = TokenBucket(any_redis, HOUR)
    bucket.take(SID, 10)

    decisions = [bucket.take(SID, 3) for _ in range(3)]

    assert [True, True, False] == _allowed(decisions)
    assert [1, 0, 0] == [d.remaining for d in decisions]
    assert [3, 3, 3] == [d.limit for d in decisions]


def test_smaller_capacity_never_goes_below_empty(any_redis: redis.Redis) -> None:
    """8 of 10 used, then capacity 3: the bucket is empty (not 5 in debt), one token in P/3."""
    bucket = TokenBucket(any_redis, HOUR)
    for _ in range(8):
        bucket.take(SID, 10)

    decision = bucket.take(SID, 3)

    assert (False, 0, 3) == (decision.allowed, decision.remaining, decision.limit)
    assert HOUR / 3 == pytest.approx(decision.retry_after, abs=1.0)


def test_larger_capacity_adds_the_difference_at_once(any_redis: redis.Redis) -> None:
    """An empty bucket of 3 seen with capacity 6 holds 3 at once, then waits P/6."""
    bucket = TokenBucket(any_redis, HOUR)
    for _ in range(3):
        bucket.take(SID, 3)

    decisions = [bucket.take(SID, 6) for _ in range(4)]

    assert [True, True, True, False] == _allowed(decisions)
    assert [2, 1, 0, 0] == [d.remaining for d in decisions]
    assert HOUR / 6 == pytest.approx(decisions[3].retry_after, abs=1.0)


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


# -- reservations: the line of deferred messages ----------------------------------------


def _ledger(n: int) -> str:
    return keys.ledger(SID, f"task-{n}")


def test_reserve_gives_each_waiting_message_its_own_slot(any_redis: redis.Redis) -> None:
    """Capacity 2 drained: reservations get slots P/2 and P apart; one beyond the horizon
    (3P/2 > P) is refused, not reserved, and told how long the line is."""
    bucket = TokenBucket(any_redis, HOUR)
    bucket.take(SID, 2)
    bucket.take(SID, 2)

    held = [bucket.reserve(SID, 2, once_key=_ledger(n), within_s=HOUR) for n in range(3)]

    assert [False, False, False] == _allowed(held)
    assert [True, True, False] == [d.reserved for d in held]
    assert [HOUR / 2, HOUR, 3 * HOUR / 2] == pytest.approx([d.retry_after for d in held], abs=1)
    assert [0, 0, 0] == [d.remaining for d in held]
    assert 0 == any_redis.exists(_ledger(2))


def test_reserve_again_keeps_the_same_slot(any_redis: redis.Redis) -> None:
    """A message that holds a slot and asks again (or takes early) gets the same slot and
    takes nothing more: the next newcomer still queues one interval behind it."""
    bucket = TokenBucket(any_redis, HOUR)
    bucket.take(SID, 4)
    for _ in range(3):
        bucket.take(SID, 4)
    first = bucket.reserve(SID, 4, once_key=_ledger(1), within_s=HOUR)

    again = bucket.reserve(SID, 4, once_key=_ledger(1), within_s=HOUR)
    early = bucket.take(SID, 4, once_key=_ledger(1))
    newcomer = bucket.reserve(SID, 4, once_key=_ledger(2), within_s=HOUR)

    assert [True, True, True] == [d.reserved for d in (again, early, newcomer)]
    assert first.retry_after == pytest.approx(again.retry_after, abs=1)
    assert first.retry_after == pytest.approx(early.retry_after, abs=1)
    assert 2 * HOUR / 4 == pytest.approx(newcomer.retry_after, abs=1)


def test_reserve_takes_at_once_when_a_token_is_free(any_redis: redis.Redis) -> None:
    """reserve on a bucket with a token left is a plain take: allowed, nothing held."""
    bucket = TokenBucket(any_redis, HOUR)

    decision = bucket.reserve(SID, 3, once_key=_ledger(1), within_s=HOUR)

    assert (True, False, 2) == (decision.allowed, decision.reserved, decision.remaining)
    assert {b"token": b"1"} == any_redis.hgetall(_ledger(1))


def test_a_reservation_is_redeemed_when_its_slot_comes(any_redis: redis.Redis) -> None:
    """Before its slot a take is refused with the time left; at it the take is allowed,
    the ledger says paid, and later takes (retries) take nothing."""
    bucket = TokenBucket(any_redis, 0.6)  # capacity 2 per 0.6 s: one token per 0.3 s
    bucket.take(SID, 2)
    bucket.take(SID, 2)
    held = bucket.reserve(SID, 2, once_key=_ledger(1), within_s=HOUR)

    early = bucket.take(SID, 2, once_key=_ledger(1))
    time.sleep(held.retry_after or 0)
    due = bucket.take(SID, 2, once_key=_ledger(1))
    retry = bucket.take(SID, 2, once_key=_ledger(1))

    assert (False, True) == (early.allowed, early.reserved)
    assert [True, True] == _allowed([due, retry])
    assert {b"token": b"1"} == any_redis.hgetall(_ledger(1))


def test_a_lower_capacity_voids_reservations(any_redis: redis.Redis) -> None:
    """Capacity 4 drained with one slot held, then capacity 2: the slot is void (the debt
    dropped); the message takes again and, the bucket being empty, waits P/2."""
    bucket = TokenBucket(any_redis, HOUR)
    for _ in range(4):
        bucket.take(SID, 4)
    bucket.reserve(SID, 4, once_key=_ledger(1), within_s=HOUR)

    decision = bucket.take(SID, 2, once_key=_ledger(1))

    assert (False, False) == (decision.allowed, decision.reserved)
    assert HOUR / 2 == pytest.approx(decision.retry_after, abs=1)
    assert {} == any_redis.hgetall(_ledger(1))


def test_a_higher_capacity_keeps_reservations_and_frees_the_rest(any_redis: redis.Redis) -> None:
    """Capacity 4 drained with one slot held, then 8: the slot stands (same wait) and the 4
    new tokens less the one owed are free at once."""
    bucket = TokenBucket(any_redis, HOUR)
    for _ in range(4):
        bucket.take(SID, 4)
    held = bucket.reserve(SID, 4, once_key=_ledger(1), within_s=HOUR)

    still = bucket.take(SID, 8, once_key=_ledger(1))
    fresh = [bucket.take(SID, 8) for _ in range(4)]

    assert (False, True) == (still.allowed, still.reserved)
    assert held.retry_after == pytest.approx(still.retry_after, abs=1)
    assert [True, True, True, False] == _allowed(fresh)


def test_peek_in_debt_shows_zero_remaining_and_the_whole_line(any_redis: redis.Redis) -> None:
    """With 2 slots held on a drained bucket of 2, a peek says 0 left (never negative) and
    that a newcomer would wait behind both: 3 intervals."""
    bucket = TokenBucket(any_redis, HOUR)
    bucket.take(SID, 2)
    bucket.take(SID, 2)
    for n in range(2):
        bucket.reserve(SID, 2, once_key=_ledger(n), within_s=2 * HOUR)

    decision = bucket.peek(SID, 2)

    assert (False, 0) == (decision.allowed, decision.remaining)
    assert 3 * HOUR / 2 == pytest.approx(decision.retry_after, abs=1)


def test_concurrent_reservations_queue_one_interval_apart(real_redis: redis.Redis) -> None:
    """8 threads reserve for 40 messages on a drained bucket of 10: every slot is distinct,
    and sorted they sit exactly P/10 apart (no two messages are promised the same token)."""
    bucket = TokenBucket(real_redis, HOUR)
    for _ in range(10):
        bucket.take(SID, 10)
    held: list[tuple[bool, float]] = []
    lock = threading.Lock()
    start = threading.Barrier(8)

    def worker(first: int) -> None:
        start.wait()
        for n in range(first, first + 5):
            d = bucket.reserve(SID, 10, once_key=_ledger(n), within_s=10 * HOUR)
            with lock:
                held.append((d.reserved, time.time() + (d.retry_after or 0.0)))

    threads = [threading.Thread(target=worker, args=(5 * i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    dues = sorted(due for _, due in held)
    gaps = [b - a for a, b in zip(dues, dues[1:], strict=False)]
    assert [True] * 40 == [reserved for reserved, _ in held]
    assert [HOUR / 10] * 39 == pytest.approx(gaps, abs=1.0)
