"""A message's lease: at most one worker talks SMTP for a message at a time.

The lease names its holder (``host:pid``). It lasts as long as the longest attempt can
(:func:`attempt_bound_s`) and then expires on its own; a holder on this host whose process
is gone (a killed pool child) is taken over at once. An attempt takes it in its first Redis
step (``shared/lua/attempt_begin.lua``, the one place that takes a lease) and releases it
in
its last (``shared/lua/attempt_finish.lua``), or with :meth:`Leases.release` when it ends
without one.

The same bound ties the broker's redelivery window to the send deadline
(:func:`check_timeouts`): a message the broker hands out again while its first send may
still be talking SMTP would be sent twice, were it not for this lease.
"""

from __future__ import annotations

import os
import socket

import redis

from postroom.shared import keys
from postroom.shared.errors import ConfigError
from postroom.shared.settings import Settings
from postroom.worker import instances

# The SMTP exchanges of one attempt that each wait at most POSTROOM_SMTP_TIMEOUT_S, besides
# one RCPT TO per recipient: connect and greeting, EHLO, STARTTLS, EHLO again, AUTH (up to
# three for LOGIN), MAIL FROM, DATA, the message and its final dot, QUIT.
FIXED_EXCHANGES = 11
# Redis work around the conversation (ledger, document, lease), in seconds.
BOOKKEEPING_S = 2.0


def send_deadline_s(smtp_timeout_s: float, recipients: int, deadline_s: float | None) -> float:
    """How long one message's SMTP exchange (waiting for a connection, connect, TLS, AUTH,
    the transaction) may last: ``POSTROOM_SEND_DEADLINE_S``, or less when the SMTP timeout
    per exchange bounds it more tightly."""
    by_exchanges = smtp_timeout_s * (FIXED_EXCHANGES + recipients)
    return by_exchanges if deadline_s is None else min(deadline_s, by_exchanges)


def attempt_bound_s(smtp_timeout_s: float, recipients: int,
                    deadline_s: float | None = None) -> float:  # fmt: skip
    """The longest one delivery attempt to ``recipients`` addresses can take: its send
    deadline (:func:`send_deadline_s`) plus the Redis work around it."""
    return send_deadline_s(smtp_timeout_s, recipients, deadline_s) + BOOKKEEPING_S


def check_timeouts(settings: Settings) -> None:
    """The broker's redelivery window must outlast the longest send; raises ConfigError."""
    longest = attempt_bound_s(settings.smtp_timeout_s, settings.max_recipients,
                              settings.send_deadline_s)  # fmt: skip
    if settings.visibility_timeout_s <= longest:
        raise ConfigError(
            f"POSTROOM_VISIBILITY_TIMEOUT_S ({settings.visibility_timeout_s} s) must be longer "
            f"than the longest send ({longest:g} s = POSTROOM_SEND_DEADLINE_S "
            f"{settings.send_deadline_s:g} s, or less when POSTROOM_SMTP_TIMEOUT_S "
            f"{settings.smtp_timeout_s:g} s x ({FIXED_EXCHANGES} exchanges + "
            f"POSTROOM_MAX_RECIPIENTS {settings.max_recipients}) is shorter, "
            f"+ {BOOKKEEPING_S:g} s): raise it, or lower the send deadline"
        )

# KEYS[1] the lease; ARGV[1] the holder
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def holder() -> str:
    """This process, as a lease names its holder: ``host:pid``, and ``/instance`` in a
    worker instance (:mod:`postroom.worker.instances`)."""
    instance = instances.current()
    me = f"{socket.gethostname()}:{os.getpid()}"
    return me if instance is None else f"{me}/{instance}"


def holder_dead(client: redis.Redis, holder: str) -> bool:
    """Whether ``holder`` is gone: a process of this host that no longer runs, or one of
    a worker instance that stopped beating (its lease may be taken over at once)."""
    if dead_here(holder):
        return True
    _, _, instance = holder.partition("/")
    return bool(instance) and not instances.is_alive(client, instance)


def dead_here(holder: str) -> bool:
    """Whether ``holder`` is a process of this host that is gone."""
    host, _, pid = holder.partition("/")[0].rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return _unreaped(int(pid))


def _unreaped(pid: int) -> bool:
    """Whether ``pid`` is a zombie: killed, but not yet reaped by its parent (or, once
    orphaned, by init, which may take a second, or forever in a container without one).
    It still answers ``kill(pid, 0)``; a broker that redelivers at once (RabbitMQ) meets it."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
    except OSError:
        return False
    return bool(fields) and fields[0] == b"Z"


class Leases:
    def __init__(self, client: redis.Redis) -> None:
        self._r = client
        self._release = client.register_script(_RELEASE)

    def held(self, sid: str, task_id: str) -> bool:
        """Whether some worker holds the message's lease now."""
        return bool(self._r.exists(keys.lease(sid, task_id)))

    def release(self, sid: str, task_id: str) -> None:
        self._release(keys=[keys.lease(sid, task_id)], args=[holder()])
