"""kombu's Redis transport, with three costs of the worker's main process taken out.

Per message, kombu's Redis channel takes one job per BRPOP and records it as unacknowledged
in a second round trip, builds a new ``redis.Redis`` client (with its whole table of reply
callbacks) for that record and again for the acknowledgement, and acknowledges each
message in a round trip of its own. Here, after a BRPOP brought one job, one atomic script
records that job unacknowledged and takes what else waits (as many as the prefetch allows),
recording each in the same step (:meth:`Channel._take_more`: jobs taken this way have no
moment in which they are in neither the queue nor the unacked table); it keeps one client
for its commands; and :meth:`Channel.ack_many` acknowledges a whole batch
(:mod:`postroom.worker.batching`) in one pipeline. A job alone in the queue costs the BRPOP and that
one script. What is stored is unchanged: the same unacked hash and index, the same
keys, the same restore rules.

Inside a worker instance (:mod:`postroom.worker.instances`, which names the set with
:func:`note_held_in`) every job recorded unacknowledged is also noted, in the same step, in
the instance's own set (:func:`postroom.shared.keys.instance_unacked`), and taken out of it with the
unacked record: when the instance dies, a survivor knows which messages to put back onto
the queue at once.

Only the worker uses it, and only on a ``redis://`` broker (:func:`transport_for`); other
brokers (``rediss://`` included, whose TLS checks kombu makes by the scheme's name) keep
kombu's own transport.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.transport.virtual import base as virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads

from postroom.shared.scripts import script

#: kombu's Redis transport: the hash of unacknowledged messages and its index (by default)
UNACKED: str = kombu_redis.Channel.unacked_key
UNACKED_INDEX: str = kombu_redis.Channel.unacked_index_key

_held: str | None = None


def note_held_in(key: str | None) -> None:
    """Note this process's unacknowledged delivery tags in the set ``key`` from now on
    (None: in none); the worker's instance names it before the consumer starts."""
    global _held
    _held = key


def held_key() -> str | None:
    """The set of this worker instance's unacknowledged delivery tags (None outside one)."""
    return _held


def unacked_message(entry: bytes | str) -> tuple[str, str]:
    """The stored message (as JSON) and the routing key of an entry of kombu's unacked
    hash (``[message, exchange, routing key]``)."""
    message, _exchange, routing_key = loads(bytes_to_str(entry))
    return dumps(message), routing_key


class QoS(kombu_redis.QoS):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # delivery tags that Channel._take_more recorded as unacknowledged already
        self.recorded: set[str] = set()
        # while a BRPOP's job is delivered: its unacked record waits for the take after it
        self.defer_record = False
        self.deferred: tuple[str, str] | None = None

    def append(self, message: Any, delivery_tag: str) -> None:
        if delivery_tag in self.recorded:
            self.recorded.discard(delivery_tag)
            virtual.QoS.append(self, message, delivery_tag)  # the in-process books only
            return
        if self.defer_record and self.deferred is None:
            info = message.delivery_info
            entry = dumps([message._raw, info["exchange"], info["routing_key"]])
            self.deferred = (delivery_tag, entry)
            virtual.QoS.append(self, message, delivery_tag)  # recorded by the take after
            return
        # as kombu's own append, with the instance's note in the same pipeline
        info = message.delivery_info
        self.record(delivery_tag, dumps([message._raw, info["exchange"], info["routing_key"]]))
        virtual.QoS.append(self, message, delivery_tag)

    def take_deferred(self) -> tuple[str, str] | None:
        deferred, self.deferred = self.deferred, None
        return deferred

    def record(self, delivery_tag: str, entry: str) -> None:
        """Record one job unacknowledged, as kombu's own ``append`` does (and note it held
        by this instance)."""
        held = held_key()
        with self.pipe_or_acquire() as pipe:
            pipe.zadd(self.unacked_index_key, {delivery_tag: time.time()})
            pipe.hset(self.unacked_key, delivery_tag, entry)
            if held is not None:
                pipe.sadd(held, delivery_tag)
            pipe.execute()

    def _remove_from_indices(self, delivery_tag: str, pipe: Any = None) -> Any:
        """kombu's removal of an unacked record (ack, reject, restore), and of the
        instance's note of it."""
        pipe = super()._remove_from_indices(delivery_tag, pipe)
        held = held_key()
        if held is not None:
            pipe.srem(held, delivery_tag)
        return pipe

    def ack_many(self, delivery_tags: Sequence[str]) -> None:
        """Acknowledge ``delivery_tags`` in one pipeline (one round trip)."""
        with self.pipe_or_acquire() as pipe:
            for tag in delivery_tags:
                self._remove_from_indices(tag, pipe)
            pipe.execute()
        for tag in delivery_tags:
            virtual.QoS.ack(self, tag)  # the in-process bookkeeping (prefetch accounting)


class Channel(kombu_redis.Channel):
    QoS = QoS

    _kept_client: Any = None
    #: the most jobs one take adds to the one BRPOP brought
    take_max = 32

    def _create_client(self, asynchronous: bool = False) -> Any:
        # the asynchronous client serves BRPOP and is already kept by the channel
        if asynchronous:
            return super()._create_client(asynchronous=True)
        if self._kept_client is None:
            self._kept_client = super()._create_client()
        return self._kept_client

    #: while one step's jobs are being delivered (the BRPOP's and the take's after it)
    delivering = False
    #: called when that ends (set by the consumer's strategy, postroom.worker.batching)
    after_delivery: Any = None

    def _brpop_read(self, **options: Any) -> Any:
        self.qos.defer_record = True
        self.delivering = True
        try:
            try:
                delivered = super()._brpop_read(**options)
            except BaseException:
                self._record_deferred()
                raise
            finally:
                self.qos.defer_record = False
            if delivered:
                self._take_more()
            return delivered
        finally:
            self.delivering = False
            after, self.after_delivery = self.after_delivery, None
            if after is not None:
                after()

    def _record_deferred(self) -> None:
        deferred = self.qos.take_deferred()
        if deferred is not None:
            self.qos.record(*deferred)

    def _take_more(self) -> None:
        """After a BRPOP brought one job: record it unacknowledged and take what else waits
        in the queue, as many as the prefetch allows, each recorded unacknowledged in the
        same atomic step (``shared/lua/broker_take.lua``), and deliver them as kombu
        delivers one."""
        room = self.qos.can_consume_max_estimate()
        room = self.take_max if room is None else min(room, self.take_max)
        if self.global_keyprefix or len(self.active_queues) != 1:
            self._record_deferred()  # kombu's own way (its client adds the key prefix)
            return
        [queue] = self.active_queues
        script_keys = [self._q_for_pri(queue, 0), self.unacked_key, self.unacked_index_key]
        held = held_key()
        if held is not None:
            script_keys.append(held)
        args: list[str | int | float] = [max(0, room), time.time()]
        deferred = self.qos.take_deferred()
        if deferred is not None:
            args += deferred
        elif room <= 0:
            return
        try:
            taken = script("broker_take")(self._create_client(), script_keys, args)
        except self.connection_errors:
            return  # BRPOP's own path notices the lost connection and reconnects
        for raw in taken:
            payload = loads(bytes_to_str(raw))
            self.qos.recorded.add(payload["properties"]["delivery_tag"])
            self.connection._deliver(payload, queue)

    def ack_many(self, messages: Sequence[Any]) -> None:
        """Acknowledge kombu ``messages`` of this channel together."""
        self.qos.ack_many([m.delivery_tag for m in messages])
        for message in messages:
            message._state = "ACK"

    def close(self) -> None:
        super().close()
        self._kept_client = None


def restore(channel: Any, delivery_tags: Sequence[str]) -> None:
    """Put the messages of ``delivery_tags`` (unacked records, another instance's too) back
    onto their queues and drop their records, as kombu restores unacknowledged messages."""
    for tag in delivery_tags:
        channel.qos.restore_by_tag(tag)


class Transport(kombu_redis.Transport):
    Channel = Channel


def transport_for(broker_url: str) -> str | None:
    """This transport (by name, as Celery's ``broker_transport`` takes it and as the worker's
    banner shows it) for a Redis broker URL, else None (kombu picks by the scheme)."""
    if broker_url.startswith("redis://"):
        return f"{__name__}:Transport"
    return None
