"""Many sends in flight to relays far away: the per-relay cap, backing off a relay that
turns connections away, the send deadline, and the split of an instance's budgets over
its pool processes. The relays are aiosmtpd servers behind a proxy that holds every reply
back some tens of milliseconds (:mod:`tests.delay_proxy`)."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from postroom.shared.errors import ConfigError, TransientSendError
from postroom.shared.relays import Relay
from postroom.worker import pool as pool_module
from postroom.worker.budgets import Budgets, batch_size, split
from postroom.worker.lanes import run_in_lanes, width_for
from postroom.worker.message import build_message
from postroom.worker.pool import SmtpPool
from postroom.worker.sending import Attempt
from postroom.worker.smtp import make_ssl_context
from tests.delay_proxy import DelayProxy
from tests.e2e import Stack
from tests.helpers import make_settings
from tests.smtp_fixtures import RTT_S
from tests.smtp_server import ScriptedSmtpServer
from tests.test_worker_redis import document, make_context, make_job, queued

TLS = make_ssl_context(None)


def deliver(pool: SmtpPool, port: int, n: int, deadline: float | None = None,
            timeout: float = 5.0) -> None:  # fmt: skip
    rcpt = f"r{n}@example.com"
    data = build_message(sender="s@postroom.test", to=[rcpt], cc=[], subject="far",
                         text="hello", html=None, message_id=f"<{n}@postroom.test>")
    relay = Relay(host="127.0.0.1", port=port, scheme="")
    pool.deliver(relay, connect_host="127.0.0.1", sender="s@postroom.test", recipients=[rcpt],
                 data=data, timeout=timeout, ssl_context=TLS, local_hostname="w.test",
                 deadline=deadline)  # fmt: skip


def at_once(count: int, fn: Callable[[int], None]) -> list[BaseException]:
    """Run ``fn(i)`` for i in range(count) on as many threads, all at once; the errors."""
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            fn(i)
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return errors


def most_at_once(server: ScriptedSmtpServer) -> int:
    """The most transactions the server had under way at one moment (MAIL FROM to the end
    of DATA)."""
    events = sorted([(m.mail_at, 1) for m in server.messages]
                    + [(m.received_at, -1) for m in server.messages])  # fmt: skip
    now = peak = 0
    for _, step in events:
        now += step
        peak = max(peak, now)
    return peak


# -- the pool -------------------------------------------------------------------------------


def test_several_transactions_in_flight_and_never_more_than_the_relay_cap(
    relay_server: ScriptedSmtpServer, far_relay: DelayProxy
) -> None:
    """Twelve threads sending 36 messages at once to a relay 30 ms away through a pool
    capped at four connections per relay: four sessions open together, five never,
    several transactions under way at one moment (a session spends a round trip of each
    message waiting for the reply to the end of DATA), every message arrives once, and it
    takes well under half the one-connection time."""
    pool = SmtpPool(max_per_relay=4)
    started = time.monotonic()
    def three(i: int) -> None:
        for k in range(3):
            deliver(pool, far_relay.port, 3 * i + k)

    errors = at_once(12, three)
    took = time.monotonic() - started
    pool.close_all()

    assert [] == errors
    assert 4 == far_relay.peak
    assert 3 <= most_at_once(relay_server) <= 4
    assert Counter(f"<{n}@postroom.test>" for n in range(36)) == Counter(
        m.message_id for m in relay_server.messages
    )
    assert took < 36 * 2 * RTT_S / 2  # one connection would need 2 round trips each


def test_a_relay_answering_421_to_new_connections_gets_fewer(
    relay_server: ScriptedSmtpServer, far_relay: DelayProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the relay answers 421 to new connections the pool halves its allowance with
    each refusal (down to one); the next eight sends at once then share that one
    connection; after the back-off period each delivered message gives one back."""
    monkeypatch.setattr(pool_module, "BACKOFF_S", 1.5)
    pool = SmtpPool(max_per_relay=8)
    relay = Relay(host="127.0.0.1", port=far_relay.port, scheme="")
    far_relay.refuse = True
    errors = at_once(8, lambda i: deliver(pool, far_relay.port, i))
    assert 8 == len(errors) and all(isinstance(e, TransientSendError) for e in errors)
    assert 1 == pool.allowance(relay)
    assert 8 == pool.stats().backoffs

    far_relay.refuse = False
    assert [] == at_once(8, lambda i: deliver(pool, far_relay.port, 100 + i))
    assert (1, 1) == (far_relay.peak, far_relay.accepted)

    time.sleep(1.6)
    for n in range(3):
        deliver(pool, far_relay.port, 200 + n)
    assert 4 == pool.allowance(relay)
    pool.close_all()


def test_the_send_deadline_ends_a_slow_exchange(relay_server: ScriptedSmtpServer) -> None:
    """A relay that takes 2 s to answer RCPT TO, a deadline 0.3 s away and an SMTP timeout
    of 5 s: the send ends as a transient failure naming the deadline within about 0.3 s,
    and nothing is delivered."""
    relay_server.script.rcpt_delay_s = 2.0
    pool = SmtpPool()
    started = time.monotonic()
    with pytest.raises(TransientSendError) as info:
        deliver(pool, relay_server.port, 1, deadline=started + 0.3)
    took = time.monotonic() - started
    pool.close_all()

    assert "deadline" in info.value.message
    assert 0.25 < took < 1.0
    assert [] == relay_server.messages


def test_the_send_deadline_bounds_the_wait_for_a_connection(
    relay_server: ScriptedSmtpServer,
) -> None:
    """With the relay's only connection busy for 1.5 s, a second send whose deadline is
    0.3 s away does not wait for it: a transient failure after about 0.3 s."""
    relay_server.script.rcpt_delay_s = 1.5
    pool = SmtpPool(max_per_relay=1)
    first = threading.Thread(target=deliver, args=(pool, relay_server.port, 1))
    first.start()
    time.sleep(0.2)  # the first send holds the connection
    started = time.monotonic()
    with pytest.raises(TransientSendError) as info:
        deliver(pool, relay_server.port, 2, deadline=started + 0.3)
    took = time.monotonic() - started
    first.join(10)
    pool.close_all()

    assert "deadline" in info.value.message
    assert 0.25 < took < 1.0
    assert ["<1@postroom.test>"] == [m.message_id for m in relay_server.messages]


# -- budgets and lanes ------------------------------------------------------------------------


def test_the_budgets_are_split_without_exceeding_the_caps() -> None:
    """Each pool process gets its share rounded down, so that the shares never add up to
    more than the instance's caps; a process that would get nothing is a start-up error."""
    settings = make_settings("redis://127.0.0.1:6379/1")
    assert Budgets(sends=50, per_relay=10) == split(settings, 2)
    assert Budgets(sends=33, per_relay=6) == split(settings, 3)
    assert Budgets(sends=100, per_relay=20) == split(settings, 1)
    with pytest.raises(ConfigError, match="POSTROOM_RELAY_CONCURRENCY"):
        split(settings, 21)


def test_lanes_keep_the_order_of_the_answers() -> None:
    """A batch run in lanes answers in the order of its items; the lanes run at the same
    time (each waits at a barrier for the other two)."""
    barrier = threading.Barrier(3, timeout=5)

    def lane(items: list[int]) -> list[int]:
        barrier.wait()
        return [i * 10 for i in items]

    assert [i * 10 for i in range(7)] == run_in_lanes(list(range(7)), 3, lane)
    assert [0, 10] == run_in_lanes([0, 1], 1, lambda items: [i * 10 for i in items])


# -- a worker ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_worker_keeps_many_sends_in_flight_within_the_relay_cap(
    redis_url: str, real_redis: object, relay_server: ScriptedSmtpServer,
    far_relay: DelayProxy, tmp_path: Path,
) -> None:
    """A real worker (two pool processes) with ``POSTROOM_RELAY_CONCURRENCY=6`` sending 60
    messages to a relay 30 ms away: six sessions open together at the relay, never seven,
    several transactions under way at one moment, each Message-ID received once."""
    settings = make_settings(
        redis_url, default_smtp_url=f"smtp+plain://127.0.0.1:{far_relay.port}",
        smtp_allow_hosts=("127.0.0.1",), relay_concurrency=6, sends_in_flight=12,
    )
    stack = Stack(settings, relay_server, tmp_path)
    try:
        stack.solution("acme", hLimit=100000)
        ids = stack.send_many(60)
        stack.start_worker(concurrency=2)
        docs = stack.wait_all_final(ids, timeout=60)
    finally:
        stack.stop()

    assert ["sent"] * 60 == [d["state"] for d in docs]
    assert {d["result"]["messageId"]: 1 for d in docs} == Counter(
        m.message_id for m in relay_server.messages
    )
    assert 6 == far_relay.peak
    assert 3 <= most_at_once(relay_server) <= 6


def test_the_lanes_follow_how_long_a_send_takes() -> None:
    """No send yet: the whole budget. A relay on loopback (a send of a millisecond): one
    lane. A relay 50 ms away (a send of 100 ms): the whole budget of 50."""
    assert 50 == width_for(None, 50)
    assert 1 == width_for(0.001, 50)
    assert 50 == width_for(0.1, 50)
    assert 10 == width_for(0.02, 50)


def test_an_attempt_past_its_send_deadline_is_retried(
    real_redis: redis.Redis, relay_server: ScriptedSmtpServer
) -> None:
    """An attempt whose relay answers RCPT TO after 2 s, with ``POSTROOM_SEND_DEADLINE_S``
    0.4 and an SMTP timeout of 5 s: the attempt ends within about the deadline, its
    document ``retrying`` with a transient error naming the deadline, nothing sent."""
    relay_server.script.rcpt_delay_s = 2.0
    ctx = make_context(real_redis, smtp_port=relay_server.port, send_deadline_s=0.4)
    job = make_job()
    queued(ctx, job)
    started = time.monotonic()
    Attempt(ctx, job).run()
    took = time.monotonic() - started
    ctx.pool.close_all()

    doc = document(real_redis)
    assert ("retrying", 504) == (doc["state"], doc["error"]["status"])
    assert "deadline" in doc["error"]["error"]
    assert took < 1.5
    assert [] == relay_server.messages


def test_the_batch_holds_four_messages_per_connection_unless_set() -> None:
    """Left at its default (50), the batch grows to four messages per connection a process
    may open to one relay; a batch size that is set is kept as it is."""
    settings = make_settings("redis://127.0.0.1:6379/1")
    assert 50 == batch_size(settings, split(settings, 2))
    wide = settings.replace(relay_concurrency=100)
    assert 200 == batch_size(wide, split(wide, 2))
    assert 1 == batch_size(wide.replace(worker_batch=1), split(wide, 2))
