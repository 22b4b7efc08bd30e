"""The delivery rules: what is retried and when (the retry policy, patience with Redis),
and the relation between the broker's redelivery window and the SMTP timeouts."""

from __future__ import annotations

import gc
import random
import ssl

import pytest

from postroom.shared.errors import ConfigError
from postroom.shared.queue import celery_config, restore_interval_s
from postroom.shared.settings import Settings
from postroom.worker import outcomes
from postroom.worker.app import HeapStep, make_celery
from postroom.worker.lease import attempt_bound_s, check_timeouts
from postroom.worker.retrying import RetryPolicy, StorePatience

POLICY = RetryPolicy(base_s=60, max_delay_s=3600, max_attempts=30, max_age_s=86400)


@pytest.fixture(autouse=True)
def _seeded() -> None:
    random.seed(1234)


def test_backoff_doubles_from_the_base_up_to_the_maximum() -> None:
    """Before jitter the delay after attempt n is base × 2^(n-1), capped at the maximum."""
    expected = [60, 120, 240, 480, 960, 1920, 3600, 3600]
    assert expected == [POLICY.ceiling(n) for n in range(1, 9)]


def test_jitter_keeps_each_delay_between_half_and_all_of_its_ceiling() -> None:
    """Each delay is random within [ceiling/2, ceiling], and not always the same."""
    for attempts in range(1, 12):
        ceiling = POLICY.ceiling(attempts)
        delays = [POLICY.next_delay(attempts, 0.0) for _ in range(200)]
        assert all(d is not None and ceiling / 2 <= d <= ceiling for d in delays)
        assert len(set(delays)) > 100


def test_a_servers_hint_is_honoured_within_the_maximum_delay() -> None:
    """ "Try again in N seconds": never sooner than N, but never later than the maximum."""
    assert 900 == POLICY.next_delay(1, 0.0, hint_s=900)
    assert 3600 == POLICY.next_delay(1, 0.0, hint_s=10 * 3600)
    assert 30 <= (POLICY.next_delay(1, 0.0, hint_s=1) or 0) <= 60


def test_the_budget_ends_at_the_attempt_limit() -> None:
    """No delay once ``max_attempts`` attempts have been made."""
    assert POLICY.next_delay(29, 0.0) is not None
    assert POLICY.next_delay(30, 0.0) is None


def test_the_budget_ends_when_the_next_try_would_be_too_old() -> None:
    """No delay when the next attempt would come after ``max_age_s`` from the request."""
    assert POLICY.next_delay(3, 86400 - 241) is not None
    assert POLICY.next_delay(3, 86400 - 100) is None


def test_the_default_schedule_spends_attempts_and_age_together() -> None:
    """With the defaults (60 s base, 1 h cap, 30 attempts, 1 day) the last attempts fall
    near the end of the day: neither budget leaves most of the other unused."""
    policy = RetryPolicy.from_settings(Settings())
    assert (60.0, 3600.0, 30, 86400) == (
        policy.base_s, policy.max_delay_s, policy.max_attempts, policy.max_age_s)
    fastest = sum(policy.ceiling(n) / 2 for n in range(1, 30))
    slowest = sum(policy.ceiling(n) for n in range(1, 30))
    assert fastest < 86400 < slowest


def test_store_patience_backs_off_and_stops_at_its_budget() -> None:
    """Waits grow from the first step, double, are capped, and end with the budget."""
    waits = list(StorePatience(budget_s=0.05, first_s=0.001, max_step_s=0.004).waits())
    assert [0.001, 0.002, 0.004] == waits[:3]
    assert all(w <= 0.004 for w in waits)
    assert [] == list(StorePatience(budget_s=0).waits())


def test_store_patience_stays_inside_the_redelivery_window() -> None:
    """A worker never waits for Redis longer than half the broker's redelivery window,
    nor more than five minutes."""
    assert 30 == StorePatience.from_settings(Settings(visibility_timeout_s=60)).budget_s
    assert 300 == StorePatience.from_settings(Settings()).budget_s


def test_the_longest_send_counts_every_smtp_exchange() -> None:
    """The bound is the SMTP timeout times (11 fixed exchanges + one per recipient), plus
    2 s of bookkeeping; with the defaults it is well inside the redelivery window."""
    assert 30 * 61 + 2 == attempt_bound_s(30, 50)
    check_timeouts(Settings())


def test_a_redelivery_window_shorter_than_the_longest_send_is_refused() -> None:
    """The worker refuses to start when the broker could hand a message out again while its
    first send may still be talking SMTP; the longest send is the send deadline (120 s by
    default, not the SMTP timeout x the recipient limit), and the message names it."""
    settings = Settings(smtp_timeout_s=30, max_recipients=50, visibility_timeout_s=122)
    with pytest.raises(ConfigError) as info:
        make_celery(settings)
    message = str(info.value)
    for name in ("POSTROOM_VISIBILITY_TIMEOUT_S", "POSTROOM_SEND_DEADLINE_S", "122"):
        assert name in message
    make_celery(settings.replace(visibility_timeout_s=123))


def test_the_send_deadline_bounds_an_attempt() -> None:
    """An attempt lasts at most the send deadline plus 2 s of bookkeeping, or less when the
    SMTP timeout per exchange bounds it more tightly."""
    assert 120 + 2 == attempt_bound_s(30, 50, 120)
    assert 1.5 * 12 + 2 == attempt_bound_s(1.5, 1, 120)


def test_the_broker_is_configured_for_at_least_once() -> None:
    """Late acks, requeue of a lost pool process's message, one batch reserved per process,
    the redelivery window, and a sweep for overdue messages every few seconds."""
    app = make_celery(Settings(visibility_timeout_s=7200, worker_batch=16))
    conf = app.conf
    assert (True, True, 16) == (
        conf.task_acks_late, conf.task_reject_on_worker_lost, conf.worker_prefetch_multiplier)
    transport = celery_config(Settings(visibility_timeout_s=7200))["broker_transport_options"]
    assert (7200, 10, 1) == (transport["visibility_timeout"],
                             transport["unacked_restore_interval"],
                             transport["unacked_restore_throttle"])
    assert [1, 1, 5, 10] == [restore_interval_s(v) for v in (5, 15, 50, 7200)]


def test_the_worker_freezes_its_objects_before_the_pool_forks() -> None:
    """The worker's steps include one that freezes the main process's objects when the
    worker is built (before its pool forks), so that the pool processes' garbage
    collector leaves the shared pages alone."""
    app = make_celery(Settings(visibility_timeout_s=7200))
    assert HeapStep in app.steps["worker"]
    before = gc.get_freeze_count()
    try:
        HeapStep(parent=None)
        assert gc.get_freeze_count() > before
    finally:
        gc.unfreeze()


def test_a_tls_stream_cut_short_is_transient_and_a_tls_failure_permanent() -> None:
    """An unexpected EOF inside TLS (the relay hung up mid-DATA) is a lost connection and
    retried; a failed handshake or certificate is a permanent ``TlsError``."""
    eof = outcomes.from_exception(ssl.SSLEOFError(8, "EOF occurred in violation of protocol"))
    closed = outcomes.from_exception(ssl.SSLZeroReturnError(6, "TLS/SSL connection closed"))
    handshake = outcomes.from_exception(ssl.SSLError(1, "wrong version number"))
    assert (True, True, False) == (eof.transient, closed.transient, handshake.transient)
    assert "TlsError" == handshake.type
