"""The next message's envelope written with the final dot of the one before (RFC 2920), on
a real aiosmtpd relay that offers PIPELINING: a connection then carries a message per
round trip, and every message still gets its own outcome when the relay refuses the dot
before it, its MAIL FROM, or all its recipients."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from functools import partial

from postroom.shared.errors import SmtpRejected, TransientSendError
from postroom.shared.relays import Relay
from postroom.worker.message import build_message
from postroom.worker.pool import SmtpPool
from postroom.worker.smtp import DeliveryResult, SmtpConnection, make_ssl_context
from tests.delay_proxy import DelayProxy
from tests.smtp_fixtures import RTT_S
from tests.smtp_server import ScriptedSmtpServer

TLS = make_ssl_context(None)
SENDER = "s@postroom.test"


def message(n: int, rcpt: str | None = None) -> tuple[list[str], bytes]:
    rcpt = rcpt or f"r{n}@example.com"
    data = build_message(sender=SENDER, to=[rcpt], cc=[], subject=f"m{n}", text="hello",
                         html=None, message_id=f"<{n}@postroom.test>")  # fmt: skip
    return [rcpt], data


def deliver(pool: SmtpPool, relay: Relay, n: int, sender: str = SENDER,
            rcpt: str | None = None) -> DeliveryResult:  # fmt: skip
    """Message ``n`` through ``pool`` to ``relay``."""
    rcpts, data = message(n, rcpt)
    return pool.deliver(relay, connect_host="127.0.0.1", sender=sender, recipients=rcpts,
                        data=data, timeout=5.0, ssl_context=TLS, local_hostname="w.test")


def in_threads(count: int, target: Callable[[int], None]) -> None:
    """``target(i)`` in ``count`` threads at once, each waited for."""
    threads = [threading.Thread(target=target, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)


def send_in_threads(pool: SmtpPool, relay: Relay, count: int, each: int) -> list[BaseException]:
    """``count`` threads each deliver ``each`` messages in turn (thread ``i`` the numbers
    ``each * i`` on); the pool closed after; the errors they met."""
    errors: list[BaseException] = []

    def send(i: int) -> None:
        try:
            for k in range(each):
                deliver(pool, relay, each * i + k)
        except BaseException as exc:  # noqa: BLE001 - reported by the caller
            errors.append(exc)

    in_threads(count, send)
    pool.close_all()
    return errors


def test_each_message_gets_its_own_outcome_when_its_envelope_followed_a_dot(
    relay_server: ScriptedSmtpServer,
) -> None:
    """Five messages on one session, each envelope group written after the final dot of
    the message before: the relay refuses the first message's content (554), then the
    third's MAIL FROM (550), then the fifth's only recipient (550). The second and the
    fourth are delivered, the others raise their own refusal, and the session stays in
    step throughout (the fifth's refusal is read in its place, after the fourth's 250)."""
    relay_server.script.data_replies.append("554 5.7.1 content refused")
    relay_server.script.sender_replies = {"refused@postroom.test": "550 5.7.1 sender refused"}
    relay_server.script.rcpt_replies = {"bad@example.com": "550 5.1.1 no such user"}
    msgs = [message(1), message(2), message(3), message(4), message(5, "bad@example.com")]
    senders = [SENDER, SENDER, "refused@postroom.test", SENDER, SENDER]
    conn = SmtpConnection()
    conn.open(Relay(host="127.0.0.1", port=relay_server.port, scheme=""),
              connect_host=None, timeout=5.0, ssl_context=TLS,
              local_hostname="w.test")  # fmt: skip
    written: list[int] = []

    def then(n: int) -> bytes:  # the envelope of message n (1-based), noted as written
        written.append(n)
        rcpts, data = msgs[n - 1]
        return conn.envelope(senders[n - 1], rcpts, len(data))

    outcomes: list[object] = []
    try:
        for n in range(1, 6):
            rcpts, data = msgs[n - 1]
            try:
                result = conn.transaction(
                    senders[n - 1], rcpts, data, envelope_sent=n in written,
                    then=partial(then, n + 1) if n < 5 else None,
                )
                outcomes.append(result.response)
            except SmtpRejected as err:
                outcomes.append(err.extra.get("smtp_code"))
    finally:
        conn.close()

    assert [2, 3, 5] == written  # no envelope followed the third: it never sent a dot
    assert 554 == outcomes[0]
    assert str(outcomes[1]).startswith("250")
    assert 550 == outcomes[2]
    assert str(outcomes[3]).startswith("250")
    assert 550 == outcomes[4]
    assert ["<2@postroom.test>", "<4@postroom.test>"] == [
        m.message_id for m in relay_server.messages
    ]


def test_a_kept_connection_carries_a_message_per_round_trip(
    relay_server: ScriptedSmtpServer, far_relay: DelayProxy
) -> None:
    """Four threads send 24 messages through a pool allowed one connection to a relay
    30 ms away. The threads that find the connection busy follow it: at the relay the
    MAIL FROM of most messages arrives right behind the final dot of the one before (well
    under a round trip later; a send that waited for the dot's reply would come a whole
    round trip later), one session carries them all, each arrives once."""
    pool = SmtpPool(max_per_relay=1)
    relay = Relay(host="127.0.0.1", port=far_relay.port, scheme="")
    errors = send_in_threads(pool, relay, 4, 6)

    got = sorted(relay_server.messages, key=lambda m: m.mail_at)
    gaps = [b.mail_at - a.received_at for a, b in zip(got, got[1:], strict=False)]
    behind = [g for g in gaps if g < RTT_S / 2]
    assert [] == errors
    assert 1 == far_relay.peak == far_relay.accepted
    assert Counter(f"<{n}@postroom.test>" for n in range(24)) == Counter(
        m.message_id for m in relay_server.messages
    )
    assert len(behind) >= len(gaps) // 2, gaps
    assert pool.stats().pipelined >= len(gaps) // 2


def test_a_relay_without_pipelining_gets_one_transaction_at_a_time(
    relay_server: ScriptedSmtpServer,
) -> None:
    """Without PIPELINING nothing follows a busy connection: every send waits for its
    own turn, and every message still arrives once."""
    relay_server.pipelining = False  # read when the relay answers EHLO
    pool = SmtpPool(max_per_relay=1)
    relay = Relay(host="127.0.0.1", port=relay_server.port, scheme="")
    errors = send_in_threads(pool, relay, 3, 3)

    assert [] == errors
    assert (0, 8) == (pool.stats().pipelined, pool.stats().reused)
    assert 9 == len({m.message_id for m in relay_server.messages}) == len(relay_server.messages)


def test_a_follower_whose_connection_breaks_at_the_dot_sends_on_a_new_one(
    relay_server: ScriptedSmtpServer, far_relay: DelayProxy
) -> None:
    """One connection allowed; the first send is held at RCPT TO while a second follows it.
    The relay then closes the connection after each whole message instead of answering
    the dot: the first send fails (its message may have arrived), the second — whose
    envelope went out behind that dot and died with the connection — is sent again from
    its envelope on a new connection and meets the same fate on its own. Each message
    reached the relay once."""
    relay_server.script.rcpt_gate = threading.Event()
    relay_server.script.drop_data = "before_reply"
    pool = SmtpPool(max_per_relay=1)
    relay = Relay(host="127.0.0.1", port=far_relay.port, scheme="")
    failures: dict[int, BaseException] = {}

    def send(n: int) -> None:
        try:
            deliver(pool, relay, n)
        except BaseException as exc:  # noqa: BLE001 - checked below
            failures[n] = exc

    def following() -> int:
        with pool._lock:
            return sum(len(c.followers) for busy in pool._busy.values() for c in busy)

    first = threading.Thread(target=send, args=(1,))
    first.start()
    deadline = time.monotonic() + 5
    while relay_server.held < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    second = threading.Thread(target=send, args=(2,))
    second.start()
    while following() < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    attached = following()
    relay_server.script.rcpt_gate.set()
    first.join(10)
    second.join(10)
    pool.close_all()

    assert 1 == attached
    assert {1, 2} == set(failures)
    assert all(isinstance(e, TransientSendError) for e in failures.values())
    assert 2 == far_relay.accepted  # the second's own connection after the first broke
    assert ["<1@postroom.test>", "<2@postroom.test>"] == sorted(
        m.message_id or "" for m in relay_server.dropped
    )
    assert [] == relay_server.messages


def test_followers_refused_by_the_relay_get_their_own_outcomes(
    relay_server: ScriptedSmtpServer, far_relay: DelayProxy
) -> None:
    """Three threads send 12 messages over one kept connection to a relay 30 ms away, most
    of them following the one before. The relay refuses the sender of every fourth message
    and the only recipient of the next: those two raise their own 550, whatever they
    followed or whatever followed them, and the relay has exactly the others, once."""
    relay_server.script.sender_replies = {"refused@postroom.test": "550 5.7.1 sender refused"}
    relay_server.script.rcpt_replies = lambda a: "550 5.1.1 no such user" if a.startswith(
        "bad") else None
    pool = SmtpPool(max_per_relay=1)
    relay = Relay(host="127.0.0.1", port=far_relay.port, scheme="")
    outcomes: dict[int, object] = {}

    def send(i: int) -> None:
        for k in range(4):
            n = 4 * i + k
            sender = "refused@postroom.test" if n % 4 == 1 else SENDER
            try:
                result = deliver(pool, relay, n, sender,
                                 f"bad{n}@example.com" if n % 4 == 2 else None)
                outcomes[n] = result.response[:3]
            except SmtpRejected as err:
                outcomes[n] = err.extra.get("smtp_code")
            except BaseException as exc:  # noqa: BLE001 - shown below
                outcomes[n] = exc

    in_threads(3, send)
    pool.close_all()

    assert {n: (550 if n % 4 in (1, 2) else "250") for n in range(12)} == outcomes
    assert sorted(f"<{n}@postroom.test>" for n in range(12) if n % 4 not in (1, 2)) == sorted(
        m.message_id or "" for m in relay_server.messages
    )
    assert 1 == far_relay.accepted
    assert pool.stats().pipelined >= 1
