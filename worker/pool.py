"""Kept SMTP connections, one pool per worker process, keyed by relay identity.

:meth:`SmtpPool.deliver` has the contract and the exceptions of :func:`postroom.worker.smtp.deliver`
but reuses an open, logged-in :class:`~postroom.worker.smtp.SmtpConnection` when one is idle for the
same relay. Two relays share connections only when everything that shapes the session is
equal: host, port, scheme, user, the address connected to, TLS settings, EHLO name, timeout,
and the password — compared as a keyed hash made with a per-process random key, so that the
clear password is never part of a key, a repr or a log line.

Before a connection is reused it is checked without a round trip: a socket that has become
readable while idle means the relay closed it or announced it is closing (``421``), and the
connection is then asked with ``NOOP``. A connection idle for longer than ``check_after_s``
is asked with ``NOOP`` in any case; one older than ``max_idle_s`` is closed, as is one that
has carried ``max_messages`` transactions.

A reused connection can still turn out to be dead on the first command (the relay hung up
a moment ago). Then the message gets exactly one more try on a new connection — but only
when the message's content was never written: from the moment ``DATA`` was accepted the
relay may have the whole message, and a second try could deliver it twice, so that error is
raised as it is, for the caller's retry policy (and its ledger) to handle.

A successful transaction leaves the session ready for the next one, and a refused one is
reset by :class:`SmtpConnection` itself (``RSET``); the pool adds no ``RSET`` of its own.
The pool is thread-safe (a lock guards the idle lists; SMTP I/O happens outside it), and a
pool inherited through ``fork`` forgets the parent's connections without touching them.

Per relay — host, port, user and scheme, whatever the password or address connected to —
at most ``max_per_relay`` connections are open at once (idle ones included: an idle
connection kept with other credentials is closed to make room). A relay that refuses
connections, fails to greet, or answers ``421`` gets fewer for a while, as Postfix's
``qmgr`` treats a failing destination: each such failure halves the relay's allowance
(never below one) and holds it there for :data:`BACKOFF_S`; afterwards each delivered
message gives one connection back, up to ``max_per_relay``.

:meth:`SmtpPool.deliver` takes a ``deadline`` (``time.monotonic()``): waiting for a
connection, opening it and the transaction all end by then, or the send is a
:class:`TransientSendError` (``POSTROOM_SEND_DEADLINE_S``).

A send that finds every connection to its relay busy, when the relay offers PIPELINING,
*follows* one (at most :data:`FOLLOWERS` wait in turn per connection): its envelope group
(``MAIL``, ``RCPT``, ``DATA``) is written in the same write as the current message's final
dot (RFC 2920), and the connection is handed to it once that message's reply is read; it
then reads its own group's replies and sends its message. In steady state a connection
so carries a message per round trip instead of one per two. Nothing of a follower's
message is written before its own ``354``; a connection that breaks or is closed before
the hand-over sends its followers back to look for another.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import select
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from postroom.shared.errors import SendError, TransientSendError
from postroom.shared.relays import Relay
from postroom.worker import outcomes
from postroom.worker.outcomes import Condition
from postroom.worker.smtp import DeliveryResult, SmtpConnection

# Reuse without NOOP when the connection carried a message this recently (seconds). A relay
# that hangs up in between is caught by the readable-socket check or by the one retry.
CHECK_AFTER_S = 5.0
# How long a relay that refused a connection or answered 421 keeps its reduced allowance.
BACKOFF_S = 30.0
# Sends that may wait in turn for one busy connection: the first one's envelope goes out
# with the current message's final dot; the second is there to follow the first, whose
# own dot comes as soon as its replies (already on their way) are read.
FOLLOWERS = 2

#: what the per-relay cap counts by: host, port, user, scheme
RelayId = tuple[str, int, str | None, str]


@dataclass
class _Allowance:
    """How many connections a relay may have now (:class:`SmtpPool` backs off)."""

    limit: int
    until: float = 0.0  # no growth before this (monotonic clock)


@dataclass(frozen=True)
class PoolKey:
    """What makes two sends share a connection. ``secret`` is a keyed hash of the password
    (never the password itself) and is kept out of ``repr``."""

    host: str
    port: int
    scheme: str
    user: str | None
    connect_host: str
    local_hostname: str
    timeout: float
    tls: ssl.SSLContext | None
    secret: bytes = field(repr=False)


@dataclass(frozen=True)
class PoolStats:
    """Counters since the pool was made (this process only)."""

    opened: int = 0
    reused: int = 0
    checked: int = 0  # NOOPs sent before a reuse
    stale: int = 0  # idle connections found dead or expired and closed
    reconnects: int = 0  # transparent second tries on a new connection
    retired: int = 0  # connections closed after max_messages
    backoffs: int = 0  # times a relay's allowance was halved (refused, 421)
    pipelined: int = 0  # sends whose envelope went out after the message before (RFC 2920)


@dataclass(eq=False)  # compared by identity
class _Next:
    """A send waiting for a busy connection to the same relay with the same credentials:
    its envelope group goes out in the write of the current message's final dot, and the
    connection is handed to it when the current message's reply has been read."""

    envelope: bytes
    owner: _Pooled
    #: the group went out after the owner's dot; its replies wait to be read
    written: bool = False
    #: handed over: the connection is this send's now
    conn: _Pooled | None = None
    #: the connection broke or was closed first (nothing of this send's message was written)
    lost: bool = False
    #: this send stopped waiting (its deadline) after its group went out
    abandoned: bool = False
    done: threading.Event = field(default_factory=threading.Event)


class _Pooled(SmtpConnection):
    """A pooled :class:`SmtpConnection`: when it was last used, how many messages it
    carried, and whether the last transaction got as far as writing the message."""

    def __init__(self, key: PoolKey, clock: Callable[[], float]) -> None:
        super().__init__()
        self.key = key
        self.messages = 0
        self._clock = clock
        self.last_used = clock()
        self.data_started = False
        #: the sends that follow the current one on this connection, in turn; the first
        #: one's envelope goes out after the current message's final dot (RFC 2920)
        self.followers: deque[_Next] = deque()
        #: the current transaction's envelope group went out after the message before
        self.envelope_sent = False

    def open_for(
        self, relay: Relay, ssl_context: ssl.SSLContext, deadline: float | None = None
    ) -> None:
        key = self.key
        self.open(
            relay,
            connect_host=key.connect_host,
            timeout=key.timeout,
            ssl_context=ssl_context,
            local_hostname=key.local_hostname,
            deadline=deadline,
        )
        self.last_used = self._clock()

    def _body_starts(self) -> None:
        # from here on the relay may receive the whole message: no transparent retry
        self.data_started = True

    def send(
        self,
        sender: str,
        recipients: list[str],
        data: bytes,
        then: Callable[[], bytes] | None = None,
    ) -> DeliveryResult:
        self.data_started = False
        sent, self.envelope_sent = self.envelope_sent, False
        try:
            return self.transaction(sender, recipients, data, envelope_sent=sent, then=then)
        finally:
            self.messages += 1
            self.last_used = self._clock()

    @property
    def is_open(self) -> bool:
        return self._client is not None

    def readable(self) -> bool:
        """Whether the relay sent something (or closed) while nobody asked: never the
        case for a healthy idle session. No I/O beyond a zero-timeout poll."""
        client = self._client
        sock = client.sock if client is not None else None
        if sock is None:
            return True
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return True
        return _poll_readable(sock)

    def discard(self) -> None:
        """Close the socket without QUIT: the session's state is unknown."""
        self._drop()


def _poll_readable(sock: socket.socket) -> bool:
    try:
        if hasattr(select, "poll"):
            poller = select.poll()
            poller.register(sock, select.POLLIN | select.POLLPRI)
            return bool(poller.poll(0))
        ready, _, _ = select.select([sock], [], [], 0)
        return bool(ready)
    except (OSError, ValueError):
        return True


class SmtpPool:
    """Kept SMTP connections of one process.

    ``max_idle_s``: a connection unused this long is closed rather than reused.
    ``max_messages``: a connection is closed after carrying this many transactions.
    ``max_per_relay``: connections open at once to one relay (host, port, user, scheme);
    a thread that finds them all busy waits (up to the send's timeout or deadline) for one
    to come back.
    """

    def __init__(
        self,
        max_idle_s: float = 30,
        max_messages: int = 100,
        max_per_relay: int = 1,
        check_after_s: float = CHECK_AFTER_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_messages < 1 or max_per_relay < 1:
            raise ValueError("max_messages and max_per_relay must be at least 1")
        self.max_idle_s = float(max_idle_s)
        self.max_messages = max_messages
        self.max_per_relay = max_per_relay
        self.check_after_s = float(check_after_s)
        self._clock = clock
        self._lock = threading.Condition()
        # one condition per relay, on the same lock: a connection coming back wakes one
        # thread waiting for that relay, not every waiting thread
        self._waiting: dict[RelayId, threading.Condition] = {}
        self._idle: dict[PoolKey, deque[_Pooled]] = {}
        self._open: dict[RelayId, int] = {}  # idle + busy, per relay
        # busy connections to relays that offer PIPELINING: sends may follow them
        self._busy: dict[PoolKey, set[_Pooled]] = {}
        self._allowance: dict[RelayId, _Allowance] = {}
        #: a moving average of how long a send takes here (None before the first)
        self.latency_s: float | None = None
        self._hash_key = secrets.token_bytes(32)
        self._pid = os.getpid()
        self._stats: dict[str, int] = dict.fromkeys(PoolStats.__dataclass_fields__, 0)

    # -- the one operation ------------------------------------------------------------

    def deliver(
        self,
        relay: Relay,
        *,
        connect_host: str | None,
        sender: str,
        recipients: list[str],
        data: bytes,
        timeout: float,
        ssl_context: ssl.SSLContext,
        local_hostname: str,
        deadline: float | None = None,
    ) -> DeliveryResult:
        """Send one message over a kept connection (opened when there is none), as
        :func:`postroom.worker.smtp.deliver` does over a new one; all of it (the wait for a
        connection included) before ``deadline`` (``time.monotonic()``) when given."""
        key = self.key_for(relay, connect_host, timeout, ssl_context, local_hostname)
        started = time.monotonic()
        try:
            conn, reused = self._checkout(key, relay, ssl_context, deadline,
                                          (sender, recipients, len(data)))  # fmt: skip
            conn.set_deadline(deadline)
            try:
                result = self._send(conn, sender, recipients, data)
            except SendError as err:
                if not (reused and err.transient and not conn.is_open
                        and not conn.data_started):  # fmt: skip
                    self._checkin(conn)
                    raise
                # the kept connection was dead before the message went out: one try on a
                # new connection, which takes over the dead one's slot
                self._count("reconnects")
                self._orphan(conn)
                conn = self._open_new(key, relay, ssl_context, reserved=True,
                                      deadline=deadline)  # fmt: skip
                try:
                    result = self._send(conn, sender, recipients, data)
                except SendError:
                    self._checkin(conn)
                    raise
        except SendError as err:
            if _refusal(err):
                self._back_off(_relay_id(key))
            raise
        finally:
            self._timed(time.monotonic() - started)
        self._checkin(conn)
        self._grow(_relay_id(key))
        return result

    #: how much the average below moves toward each new send's time
    LATENCY_WEIGHT = 0.2

    def _timed(self, seconds: float) -> None:
        """Fold one send's time (connection wait, SMTP exchange) into :attr:`latency_s`."""
        with self._lock:
            if self.latency_s is None:
                self.latency_s = seconds
            else:
                self.latency_s += self.LATENCY_WEIGHT * (seconds - self.latency_s)

    def allowance(self, relay: Relay) -> int:
        """How many connections ``relay`` may have open now (less than ``max_per_relay``
        while it is backed off)."""
        rid = (relay.host.lower(), relay.port, relay.user, relay.scheme)
        with self._lock:
            return self._limit(rid)

    def key_for(
        self,
        relay: Relay,
        connect_host: str | None,
        timeout: float,
        ssl_context: ssl.SSLContext,
        local_hostname: str,
    ) -> PoolKey:
        password = (relay.password or "").encode("utf-8", "surrogatepass")
        secret = hmac.new(self._hash_key, password, hashlib.sha256).digest()
        return PoolKey(
            host=relay.host.lower(),
            port=relay.port,
            scheme=relay.scheme,
            user=relay.user,
            connect_host=connect_host or relay.host,
            local_hostname=local_hostname,
            timeout=float(timeout),
            tls=ssl_context if relay.scheme in ("smtp", "smtps") else None,
            secret=secret,
        )

    # -- housekeeping -----------------------------------------------------------------

    def close_idle(self) -> int:
        """Close idle connections older than ``max_idle_s``; how many were closed."""
        self._after_fork()
        now = self._clock()
        expired: list[_Pooled] = []
        with self._lock:
            for key, idle in list(self._idle.items()):
                keep = deque(c for c in idle if now - c.last_used <= self.max_idle_s)
                expired.extend(c for c in idle if now - c.last_used > self.max_idle_s)
                if keep:
                    self._idle[key] = keep
                else:
                    del self._idle[key]
        for conn in expired:
            self._close(conn, "stale")
        return len(expired)

    def close_all(self) -> None:
        """QUIT and close every idle connection (one busy now returns to the pool when its
        send ends)."""
        self._after_fork()
        with self._lock:
            idle = [c for conns in self._idle.values() for c in conns]
            self._idle.clear()
        for conn in idle:
            self._close(conn, None)

    def stats(self) -> PoolStats:
        with self._lock:
            return PoolStats(**self._stats)

    def idle_count(self) -> int:
        with self._lock:
            return sum(len(conns) for conns in self._idle.values())

    # -- internals --------------------------------------------------------------------

    def _send(
        self, conn: _Pooled, sender: str, recipients: list[str], data: bytes
    ) -> DeliveryResult:
        self._offer(conn)
        try:
            return conn.send(sender, recipients, data, then=partial(self._then, conn))
        except SendError:
            raise
        except BaseException:
            # interrupted mid-conversation (a time limit, a bug): the session's state is
            # unknown, so it is never reused
            conn.discard()
            self._checkin(conn)
            raise

    def _checkout(
        self,
        key: PoolKey,
        relay: Relay,
        ssl_context: ssl.SSLContext,
        deadline: float | None,
        message: tuple[str, list[str], int] | None = None,
    ) -> tuple[_Pooled, bool]:
        """A connection for ``key``: a healthy idle one, else a new one when the relay's
        allowance has room (closing an idle one kept with other credentials to make it),
        else, for ``message`` (sender, recipients, size), the busy connection of a send
        whose final dot its envelope follows (:meth:`_follow`)."""
        self._after_fork()
        rid = _relay_id(key)
        until = time.monotonic() + key.timeout
        if deadline is not None:
            until = min(until, deadline)
        while True:
            candidate: _Pooled | None = None
            other: _Pooled | None = None
            follow: _Next | None = None
            with self._lock:
                idle = self._idle.get(key)
                if idle:
                    candidate = idle.pop()  # the most recently used: least likely stale
                    if not idle:
                        del self._idle[key]
                elif self._open.get(rid, 0) < self._limit(rid):
                    self._open[rid] = self._open.get(rid, 0) + 1  # reserve a slot
                else:
                    other = self._idle_of_relay(rid)
                    left = until - time.monotonic()
                    if other is None and message is not None and left > 0:
                        follow = self._follow(key, *message)
                    if other is None and follow is None:
                        if left <= 0:
                            if deadline is not None and time.monotonic() >= deadline:
                                raise outcomes.from_condition(Condition.DEADLINE)
                            raise TransientSendError(
                                "every connection to the relay is busy", retry_after=1.0
                            )
                        self._relay_cond(rid).wait(min(left, 1.0))
                        continue
            if follow is not None:
                handed = self._handed(follow, until)
                if handed is None:  # lost with its connection, or out of time: look again
                    continue
                self._count("pipelined" if handed.envelope_sent else "reused")
                return handed, True
            if other is not None:  # its slot is freed by closing it; then look again
                self._close(other, "stale")
                continue
            if candidate is None:
                conn = self._open_new(key, relay, ssl_context, reserved=True, deadline=deadline)
                return conn, False
            candidate.set_deadline(deadline)
            if self._usable(candidate):
                self._count("reused")
                return candidate, True
            self._close(candidate, "stale")

    # -- pipelining the next message's envelope (RFC 2920) ------------------------------

    def _offer(self, conn: _Pooled) -> None:
        """``conn`` starts a transaction: sends waiting for the relay may follow it, when
        the relay offers PIPELINING."""
        with self._lock:
            if conn.pipelining:
                self._busy.setdefault(conn.key, set()).add(conn)
                self._relay_cond(_relay_id(conn.key)).notify()

    def _follow(self, key: PoolKey, sender: str, recipients: list[str],
                size: int) -> _Next | None:  # fmt: skip
        """Follow the busy connection of ``key`` with the fewest followers, when one has
        fewer than :data:`FOLLOWERS` and may carry one message more (the caller holds the
        lock). The message's envelope group is made now, for that session."""
        room = [c for c in self._busy.get(key, ()) if c.is_open
                and len(c.followers) < FOLLOWERS
                and c.messages + len(c.followers) + 2 <= self.max_messages]  # fmt: skip
        if not room:
            return None
        conn = min(room, key=lambda c: len(c.followers))
        try:
            envelope = conn.envelope(sender, recipients, size)
        except (SendError, RuntimeError):  # said again when the message has a connection
            return None
        follower = _Next(envelope, conn)
        conn.followers.append(follower)
        return follower

    def _then(self, conn: _Pooled) -> bytes:
        """Just before ``conn`` writes its message's final dot: the first follower's
        envelope group, to go out in the same write (nothing without a follower)."""
        with self._lock:
            if not conn.followers:
                return b""
            follower = conn.followers[0]
            follower.written = True
            return follower.envelope

    def _handed(self, follower: _Next, until: float) -> _Pooled | None:
        """Wait until the connection followed is handed over (its group's replies unread
        when it went out); None when it was lost first, or when the wait ran out."""
        follower.done.wait(max(0.0, until - time.monotonic()))
        with self._lock:
            if follower.conn is not None:
                return follower.conn
            if not follower.lost:  # out of time: stop following
                follower.abandoned = True
                owner = follower.owner
                if not follower.written and follower in owner.followers:
                    owner.followers.remove(follower)
            return None

    def _orphan(self, conn: _Pooled) -> None:
        """``conn`` is dead: its followers look for another connection."""
        with self._lock:
            self._not_busy(conn)
            self._lose_followers(conn)

    def _lose_followers(self, conn: _Pooled) -> None:
        """(The caller holds the lock.)"""
        while conn.followers:
            follower = conn.followers.popleft()
            follower.lost = True
            follower.done.set()

    def _not_busy(self, conn: _Pooled) -> None:
        """(The caller holds the lock.)"""
        busy = self._busy.get(conn.key)
        if busy is not None:
            busy.discard(conn)
            if not busy:
                del self._busy[conn.key]

    def _idle_of_relay(self, rid: RelayId) -> _Pooled | None:
        """Take an idle connection to relay ``rid`` kept for other credentials or another
        address (the caller holds the lock)."""
        for other_key, idle in self._idle.items():
            if _relay_id(other_key) == rid and idle:
                conn = idle.popleft()  # the least recently used
                if not idle:
                    del self._idle[other_key]
                return conn
        return None

    def _relay_cond(self, rid: RelayId) -> threading.Condition:
        """The condition threads waiting for ``rid`` wait on (the caller holds the lock)."""
        cond = self._waiting.get(rid)
        if cond is None:
            cond = self._waiting[rid] = threading.Condition(self._lock)  # type: ignore[arg-type]
        return cond

    def _limit(self, rid: RelayId) -> int:
        allowance = self._allowance.get(rid)
        return self.max_per_relay if allowance is None else allowance.limit

    def _back_off(self, rid: RelayId) -> None:
        """The relay refused a connection or answered 421: halve its allowance, and hold
        it for :data:`BACKOFF_S`."""
        with self._lock:
            limit = max(1, self._limit(rid) // 2)
            self._allowance[rid] = _Allowance(limit, self._clock() + BACKOFF_S)
            self._stats["backoffs"] += 1

    def _grow(self, rid: RelayId) -> None:
        """A delivered message: after the back-off period, one connection more."""
        with self._lock:
            allowance = self._allowance.get(rid)
            if allowance is None or self._clock() < allowance.until:
                return
            if allowance.limit + 1 >= self.max_per_relay:
                del self._allowance[rid]
            else:
                allowance.limit += 1
            self._relay_cond(rid).notify()

    def _usable(self, conn: _Pooled) -> bool:
        if not conn.is_open:
            return False
        idle_for = self._clock() - conn.last_used
        if idle_for > self.max_idle_s:
            return False
        if conn.readable() or idle_for > self.check_after_s:
            self._count("checked")
            return conn.is_alive()
        return True

    def _open_new(
        self, key: PoolKey, relay: Relay, ssl_context: ssl.SSLContext, *, reserved: bool,
        deadline: float | None = None,
    ) -> _Pooled:
        """Open a connection; ``reserved``: its slot in ``_open`` is already counted."""
        if not reserved:
            with self._lock:
                rid = _relay_id(key)
                self._open[rid] = self._open.get(rid, 0) + 1
        conn = _Pooled(key, self._clock)
        try:
            conn.open_for(relay, ssl_context, deadline)
        except BaseException:
            self._release_slot(key)
            raise
        self._count("opened")
        return conn

    def _checkin(self, conn: _Pooled) -> None:
        """To the send that follows it, when one does and the session is sound; else back
        to the idle list when healthy, else closed; its slot follows it."""
        if os.getpid() != self._pid:  # sent from a forked child with the parent's pool
            conn.discard()
            return
        conn.set_deadline(None)
        unread = False
        with self._lock:
            self._not_busy(conn)
            if conn.followers:
                follower = conn.followers[0]
                if conn.is_open and not follower.abandoned:
                    conn.followers.popleft()
                    conn.envelope_sent = follower.written
                    follower.conn = conn
                    follower.done.set()
                    return
                # a group whose sender stopped waiting went out: its replies are unread
                unread = follower.written
                self._lose_followers(conn)
        if conn.is_open and unread:
            conn.discard()
            self._release_slot(conn.key)
            return
        if conn.is_open and conn.messages < self.max_messages:
            with self._lock:
                self._idle.setdefault(conn.key, deque()).append(conn)
                self._relay_cond(_relay_id(conn.key)).notify()
            return
        if conn.is_open:
            self._close(conn, "retired")
        else:
            self._release_slot(conn.key)

    def _close(self, conn: _Pooled, counter: str | None) -> None:
        try:
            conn.close()
        finally:
            self._release_slot(conn.key)
            if counter:
                self._count(counter)

    def _release_slot(self, key: PoolKey) -> None:
        rid = _relay_id(key)
        with self._lock:
            left = self._open.get(rid, 0) - 1
            if left > 0:
                self._open[rid] = left
            else:
                self._open.pop(rid, None)
            self._relay_cond(rid).notify()

    def _count(self, name: str) -> None:
        with self._lock:
            self._stats[name] += 1

    def _after_fork(self) -> None:
        """In a child forked with this pool, forget the parent's connections: closing
        our copies of the sockets leaves the parent's sessions untouched (no QUIT)."""
        pid = os.getpid()
        if pid == self._pid:
            return
        self._lock = threading.Condition()
        self._waiting = {}
        inherited = [c for conns in self._idle.values() for c in conns]
        self._idle = {}
        self._open = {}
        self._busy = {}
        self._allowance = {}
        self._pid = pid
        for conn in inherited:
            conn.discard()


def _relay_id(key: PoolKey) -> RelayId:
    return (key.host, key.port, key.user, key.scheme)


def _refusal(err: SendError) -> bool:
    """A relay that turns connections away: refused, no greeting, or a ``421`` reply."""
    if not err.transient:
        return False
    return err.message.startswith(outcomes.CONNECT_FAILED) or err.extra.get("smtp_code") == 421
