"""The SMTP connection pool (postroom.worker.pool) against a real aiosmtpd server on loopback.

Some tests put a small TCP relay between the pool and the server, to hang up the way real
relays and firewalls do: at once while the connection is idle, or silently on the next
command (the client then learns it only when it writes MAIL FROM).
"""

from __future__ import annotations

import os
import socket
import threading
from collections import deque
from collections.abc import Callable, Iterator

import pytest

from postroom.shared.errors import SmtpAuthFailed, SmtpRejected, TransientSendError
from postroom.shared.relays import Relay
from postroom.worker.message import build_message
from postroom.worker.pool import SmtpPool
from postroom.worker.smtp import DeliveryResult, make_ssl_context
from tests.smtp_server import ScriptedSmtpServer

SENDER = "sender@example.com"
ALICE, BOB = "alice@example.com", "bob@example.com"
PASSWORD = "s3cret-Passw0rd"
MakeServer = Callable[..., ScriptedSmtpServer]
TLS = make_ssl_context(None)


@pytest.fixture(params=[False, True], ids=["one-by-one", "pipelining"])
def smtp_server(
    request: pytest.FixtureRequest, make_smtp_server: Callable[..., ScriptedSmtpServer]
) -> ScriptedSmtpServer:
    """The relay, once without and once with PIPELINING on offer: the pool must keep its
    promises either way (a dead kept connection found before the message went out is one
    transparent reconnect; after, none)."""
    return make_smtp_server(pipelining=request.param)


def message(n: int) -> bytes:
    return build_message(
        sender=SENDER,
        to=[ALICE],
        cc=[],
        subject=f"Message {n}",
        text="Hello",
        html=None,
        message_id=f"<{n}@example.com>",
    )


def send(
    pool: SmtpPool,
    port: int,
    n: int = 1,
    *,
    user: str | None = None,
    password: str | None = None,
    recipients: list[str] | None = None,
) -> DeliveryResult:
    relay = Relay(host="localhost", port=port, scheme="", user=user, password=password)
    return pool.deliver(
        relay,
        connect_host="127.0.0.1",
        sender=SENDER,
        recipients=recipients or [ALICE],
        data=message(n),
        timeout=5.0,
        ssl_context=TLS,
        local_hostname="worker.test",
    )


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class HangUpRelay:
    """A TCP relay on 127.0.0.1 in front of ``target_port`` that can hang up: ``hang_up()``
    closes every connection now; ``cut(n)`` makes the next ``n`` client writes close their
    connection instead of passing the command on."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._cuts = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._lock = threading.Lock()
        self._stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stopped:
            try:
                client, _ = self._listener.accept()
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                return
            with self._lock:
                self._pairs.append((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, from_client: bool) -> None:
        try:
            while chunk := src.recv(65536):
                if from_client and self._take_cut():
                    break
                dst.sendall(chunk)
        except OSError:
            pass
        for sock in (src, dst):
            _close(sock)

    def cut(self, writes: int) -> None:
        with self._lock:
            self._cuts = writes

    def _take_cut(self) -> bool:
        with self._lock:
            if self._cuts <= 0:
                return False
            self._cuts -= 1
            return True

    def hang_up(self) -> None:
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            for sock in pair:
                _close(sock)

    def stop(self) -> None:
        self._stopped = True
        _close(self._listener)  # shutdown() wakes the thread blocked in accept()
        self.hang_up()


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


@pytest.fixture
def relay_in_front(smtp_server: ScriptedSmtpServer) -> Iterator[HangUpRelay]:
    relay = HangUpRelay(smtp_server.port)
    yield relay
    relay.stop()


@pytest.fixture
def pool() -> Iterator[SmtpPool]:
    pool = SmtpPool()
    yield pool
    pool.close_all()


def ids(server: ScriptedSmtpServer) -> list[str | None]:
    return [m.message_id for m in server.messages]


# -- reuse ------------------------------------------------------------------------------


def test_ten_messages_over_one_connection(
    pool: SmtpPool, smtp_server: ScriptedSmtpServer
) -> None:
    """Ten sends to one relay share one connection, each message arrives once, and the
    pool sends no RSET or NOOP of its own between successful transactions."""
    results = [send(pool, smtp_server.port, n) for n in range(10)]

    assert [r.accepted for r in results] == [[ALICE]] * 10
    assert smtp_server.connections == 1
    assert ids(smtp_server) == [f"<{n}@example.com>" for n in range(10)]
    assert (smtp_server.rsets, pool.stats().checked) == (0, 0)
    assert (pool.stats().opened, pool.stats().reused) == (1, 9)


def test_refused_transaction_keeps_the_connection(
    pool: SmtpPool, smtp_server: ScriptedSmtpServer
) -> None:
    """A refused transaction raises as deliver() does, and the reset connection carries
    the next message."""
    smtp_server.script.rcpt_replies = {BOB: "550 5.1.1 no such user"}

    with pytest.raises(SmtpRejected):
        send(pool, smtp_server.port, 1, recipients=[BOB])
    send(pool, smtp_server.port, 2)

    assert smtp_server.connections == 1
    assert ids(smtp_server) == ["<2@example.com>"]


def test_different_credentials_never_share_a_connection(make_smtp_server: MakeServer) -> None:
    """The same user with another password gets a connection of its own (and fails to log
    in) instead of riding on the session the right password opened; the key that tells
    them apart shows no password."""
    server = make_smtp_server(auth=("user", PASSWORD))
    pool = SmtpPool(max_per_relay=2)
    try:
        send(pool, server.port, 1, user="user", password=PASSWORD)
        with pytest.raises(SmtpAuthFailed):
            send(pool, server.port, 2, user="user", password="another-password")
        send(pool, server.port, 3, user="user", password=PASSWORD)
    finally:
        pool.close_all()

    assert server.connections == 2
    assert server.logins[0] == ("user", True)
    assert [ok for _, ok in server.logins[1:]] == [False] * (len(server.logins) - 1)
    assert ids(server) == ["<1@example.com>", "<3@example.com>"]
    relay = Relay(host="localhost", port=server.port, scheme="", user="user", password=PASSWORD)
    key = pool.key_for(relay, "127.0.0.1", 5.0, TLS, "worker.test")
    assert PASSWORD not in repr(key) and PASSWORD.encode() not in key.secret


def test_max_messages_rolls_over(smtp_server: ScriptedSmtpServer) -> None:
    """A connection that carried max_messages transactions is closed; the next message
    opens a new one."""
    pool = SmtpPool(max_messages=3)
    for n in range(7):
        send(pool, smtp_server.port, n)
    pool.close_all()

    assert smtp_server.connections == 3
    assert len(smtp_server.messages) == 7
    assert pool.stats().retired == 2


def test_threads_share_at_most_max_per_key(smtp_server: ScriptedSmtpServer) -> None:
    """Four threads sending at once through a pool of two connections per relay: every
    message arrives once and no more than two connections are ever opened."""
    pool = SmtpPool(max_per_relay=2)

    def sender(base: int) -> None:
        for n in range(10):
            send(pool, smtp_server.port, base + n)

    threads = [threading.Thread(target=sender, args=(100 * t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    pool.close_all()

    assert sorted(str(i) for i in ids(smtp_server)) == sorted(
        f"<{100 * t + n}@example.com>" for t in range(4) for n in range(10)
    )
    assert smtp_server.connections <= 2


# -- expiry and checks ----------------------------------------------------------------------


def test_idle_connection_expires(smtp_server: ScriptedSmtpServer) -> None:
    """A connection idle longer than max_idle_s is closed, not reused: the next message
    goes over a new one; close_idle() closes such connections without a send."""
    clock = FakeClock()
    pool = SmtpPool(max_idle_s=30, clock=clock)
    send(pool, smtp_server.port, 1)
    clock.now += 31
    send(pool, smtp_server.port, 2)
    clock.now += 31

    closed = pool.close_idle()

    assert smtp_server.connections == 2
    assert (closed, pool.idle_count()) == (1, 0)
    assert pool.stats().stale == 2


def test_quiet_connection_is_checked_with_noop(smtp_server: ScriptedSmtpServer) -> None:
    """A connection unused for longer than check_after_s (but not expired) is asked with
    NOOP before it is reused; one used a moment ago is not."""
    clock = FakeClock()
    pool = SmtpPool(max_idle_s=30, check_after_s=5, clock=clock)
    send(pool, smtp_server.port, 1)
    clock.now += 1
    send(pool, smtp_server.port, 2)
    clock.now += 10
    send(pool, smtp_server.port, 3)
    pool.close_all()

    assert smtp_server.connections == 1
    assert pool.stats().checked == 1


def test_relay_that_hung_up_while_idle_is_replaced(
    pool: SmtpPool, smtp_server: ScriptedSmtpServer, relay_in_front: HangUpRelay
) -> None:
    """The relay closes an idle connection: the next message still arrives exactly once,
    over a new connection."""
    send(pool, relay_in_front.port, 1)
    relay_in_front.hang_up()

    send(pool, relay_in_front.port, 2)

    assert smtp_server.connections == 2
    assert ids(smtp_server) == ["<1@example.com>", "<2@example.com>"]
    assert pool.stats().stale + pool.stats().reconnects == 1


def test_dead_connection_at_mail_from_gets_one_reconnect(
    pool: SmtpPool, smtp_server: ScriptedSmtpServer, relay_in_front: HangUpRelay
) -> None:
    """A kept connection that dies on MAIL FROM (nothing of the message written yet) is
    replaced transparently once: the message arrives once, over a second connection."""
    send(pool, relay_in_front.port, 1)
    relay_in_front.cut(1)

    send(pool, relay_in_front.port, 2)

    assert ids(smtp_server) == ["<1@example.com>", "<2@example.com>"]
    assert pool.stats().reconnects == 1
    assert smtp_server.connections == 2


def test_only_one_reconnect(
    pool: SmtpPool, smtp_server: ScriptedSmtpServer, relay_in_front: HangUpRelay
) -> None:
    """When the new connection fails too, the error is raised (TransientSendError, for the
    caller's retry policy): exactly one transparent reconnect, nothing delivered."""
    send(pool, relay_in_front.port, 1)
    relay_in_front.cut(2)

    with pytest.raises(TransientSendError):
        send(pool, relay_in_front.port, 2)

    assert pool.stats().reconnects == 1
    assert ids(smtp_server) == ["<1@example.com>"]


def test_no_transparent_retry_once_the_data_was_sent(
    pool: SmtpPool, smtp_server: ScriptedSmtpServer
) -> None:
    """The relay hangs up after the whole message was written but before its reply: the
    relay may have it, so the pool raises TransientSendError instead of sending it again
    (the server saw the message exactly once)."""
    send(pool, smtp_server.port, 1)
    smtp_server.script.drop_data = "before_reply"

    with pytest.raises(TransientSendError):
        send(pool, smtp_server.port, 2)

    assert len(smtp_server.dropped) == 1
    assert len(smtp_server.messages) == 1
    assert smtp_server.connections == 1
    assert pool.stats().reconnects == 0


def test_a_new_connection_is_not_retried(smtp_server: ScriptedSmtpServer) -> None:
    """A 4xx on a connection opened for this message is the caller's to retry, as with
    deliver(): the pool does not try again on its own."""
    smtp_server.script.mail_replies = deque(["421 4.3.2 shutting down"])
    pool = SmtpPool()

    with pytest.raises(TransientSendError) as caught:
        send(pool, smtp_server.port, 1)
    pool.close_all()

    assert caught.value.extra["smtp_code"] == 421
    assert (smtp_server.connections, pool.stats().reconnects) == (1, 0)


def test_forked_child_never_uses_the_parents_connections(
    pool: SmtpPool, smtp_server: ScriptedSmtpServer
) -> None:
    """A pool inherited through fork (as a prefork child inherits it) opens connections of
    its own in the child, and the parent's kept connection still works afterwards."""
    send(pool, smtp_server.port, 1)

    pid = os.fork()
    if pid == 0:  # the child: send once, report by exit code, never return into pytest
        code = 1
        try:
            send(pool, smtp_server.port, 2)
            code = 0 if pool.stats().opened == 2 else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    send(pool, smtp_server.port, 3)

    assert os.waitstatus_to_exitcode(status) == 0
    assert ids(smtp_server) == ["<1@example.com>", "<2@example.com>", "<3@example.com>"]
    assert smtp_server.connections == 2
    assert (pool.stats().opened, pool.stats().reused) == (1, 1)
