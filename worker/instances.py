"""Worker instances: which are alive, and a dead one's messages taken back at once.

Each ``postroom worker`` instance has an id (host, main process id, a random part) that
its pool processes inherit. Its main process beats every ``POSTROOM_INSTANCE_HEARTBEAT_S``:
a key with a time to live of ``POSTROOM_INSTANCE_DEAD_AFTER_S`` (:func:`postroom.shared.keys.
instance_alive`), and its entry in the registry of instances. On a ``redis://`` broker,
postroom's transport (:mod:`postroom.shared.celery_wire.redis_transport`) notes every message the
instance takes from the queue in a set of its own, in the same atomic step that records it
unacknowledged, and takes it out when the message is acknowledged or handed back.

After each beat an instance looks for instances whose key has expired (killed outright, or
their host lost): for each, one survivor (a lock decides which) puts every message of its
set back onto the queue, as kombu's own redelivery does, then forgets it. Those messages
are then sent within seconds rather than after the broker's redelivery window. Each stays
single as before: a message whose attempt the dead instance had begun is held by a lease
that names the instance (:func:`postroom.worker.lease.holder`); a lease whose instance no longer
beats is taken over at once, and the ledger says what the relay already has.

An instance that is alive but cannot reach Redis for ``POSTROOM_INSTANCE_DEAD_AFTER_S``
is treated as dead; should it still reach the relay, a message it was sending at that
moment may go out twice (the ledger cannot know). The default, 15 s, is far above any
pause a healthy process takes.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterable

import redis

from postroom.shared import keys
from postroom.shared.celery_wire import redis_transport
from postroom.shared.redis_values import as_str

log = logging.getLogger("postroom.worker")

# how long the survivor that takes a dead instance's messages back holds its lock (s)
REAP_LOCK_S = 60

_instance: str | None = None


def new_id() -> str:
    """An id for this instance: host, process, and a random part (no ``:`` or ``/``)."""
    host = socket.gethostname().replace(":", "-").replace("/", "-")
    return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"


def configure(instance: str | None) -> None:
    """This process's instance (the main process, before the pool forks); postroom's
    Redis transport notes the messages it holds in the instance's set."""
    global _instance
    _instance = instance
    redis_transport.note_held_in(None if instance is None else keys.instance_unacked(instance))


def current() -> str | None:
    """The id of the instance this process belongs to; None outside a worker."""
    return _instance


def is_alive(client: redis.Redis, instance: str) -> bool:
    return bool(client.exists(keys.instance_alive(instance)))


class Heartbeat:
    """The main process's beat, and the taking back of dead instances' messages.

    ``clients``: where the alive key is written (the broker's Redis first, where the
    registry and the sets live; postroom's own Redis too when it is another).
    ``restore(tags)``: puts the messages with those delivery tags back onto the queue
    (None: the broker is not postroom's Redis transport; nothing is taken back here)."""

    def __init__(
        self,
        instance: str,
        clients: Iterable[redis.Redis],
        restore: Callable[[list[str]], None] | None,
        every_s: float,
        dead_after_s: float,
    ) -> None:
        self.instance = instance
        self.clients = list(clients)
        self.broker = self.clients[0]
        self.restore = restore
        self.every_s = every_s
        self.dead_after_s = dead_after_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Heartbeat:
        self.beat()
        self._thread = threading.Thread(target=self._run, name="postroom-heartbeat",
                                        daemon=True)  # fmt: skip
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop beating; the alive key is left to expire (the messages still held are
        handed back by the worker's own shutdown, or taken back once it expires)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.beat()
                if self.restore is not None:
                    self.take_back()
            except redis.RedisError as exc:
                log.warning("heartbeat: Redis unavailable (%s)", type(exc).__name__)

    def beat(self) -> None:
        ttl_ms = int(self.dead_after_s * 1000)
        for client in self.clients:
            client.set(keys.instance_alive(self.instance), "1", px=ttl_ms)
        self.broker.zadd(keys.instances(), {self.instance: time.time()})

    def take_back(self) -> int:
        """Put back onto the queue the messages of every instance that stopped beating;
        how many."""
        quiet_since = time.time() - self.dead_after_s
        restored = 0
        for raw in self.broker.zrangebyscore(keys.instances(), "-inf", quiet_since):
            other = raw.decode() if isinstance(raw, bytes) else str(raw)
            if other == self.instance or is_alive(self.broker, other):
                continue
            lock = keys.instance_reaping(other)
            if not self.broker.set(lock, self.instance, nx=True, ex=REAP_LOCK_S):
                continue  # another survivor is at it
            try:
                held = keys.instance_unacked(other)
                tags = sorted(as_str(t) for t in self.broker.smembers(held))
                if tags and self.restore is not None:
                    self.restore(tags)
                    log.warning("worker instance %s stopped beating: %d messages it held "
                                "go back onto the queue", other, len(tags))  # fmt: skip
                restored += len(tags)
                self.broker.delete(held)
                self.broker.zrem(keys.instances(), other)
            finally:
                self.broker.delete(lock)
        return restored
