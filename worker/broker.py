"""kombu's Redis transport, with two costs of the worker's main process taken out.

Per message, kombu's Redis channel builds a new ``redis.Redis`` client (a table of about
170 reply callbacks) each time it records a delivery as unacknowledged and each time it
acknowledges one, and every acknowledgement is a round trip of its own. Here the channel
keeps one client for those commands, and :meth:`Channel.ack_many` acknowledges a whole
batch (:mod:`worker.batching`) in one pipeline. What is stored, and when, is unchanged:
the same unacked hash and index, the same keys, the same restore rules.

Only the worker uses it, and only on a ``redis://`` broker (:func:`transport_for`); other
brokers (``rediss://`` included, whose TLS checks kombu makes by the scheme's name) keep
kombu's own transport.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.transport.virtual import base as virtual


class QoS(kombu_redis.QoS):
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

    def _create_client(self, asynchronous: bool = False) -> Any:
        # the asynchronous client serves BRPOP and is already kept by the channel
        if asynchronous:
            return super()._create_client(asynchronous=True)
        if self._kept_client is None:
            self._kept_client = super()._create_client()
        return self._kept_client

    def ack_many(self, messages: Sequence[Any]) -> None:
        """Acknowledge kombu ``messages`` of this channel together."""
        self.qos.ack_many([m.delivery_tag for m in messages])
        for message in messages:
            message._state = "ACK"

    def close(self) -> None:
        super().close()
        self._kept_client = None


class Transport(kombu_redis.Transport):
    Channel = Channel


def transport_for(broker_url: str) -> str | None:
    """This transport (by name, as Celery's ``broker_transport`` takes it and as the worker's
    banner shows it) for a Redis broker URL, else None (kombu picks by the scheme)."""
    if broker_url.startswith("redis://"):
        return f"{__name__}:Transport"
    return None
