"""Publishing send jobs to RabbitMQ over one kept connection, each with its confirm.

The intake publishes one kind of message only, so instead of ``Celery.send_task`` (which
builds every message anew through kombu's producer) it frames each job once
(:meth:`postroom.shared.celery_wire.task_message.TaskFraming.amqp_message`) and hands it to
py-amqp's
``basic_publish`` on a channel kept open in confirm mode: the call returns once RabbitMQ has
confirmed the message (``basic.ack``), and raises on a ``basic.nack``, a confirm that does
not come within the timeout, or a lost connection. What this saves is measured in
``docs/throughput.md`` and ``docs/scaling.md``.

The queue is declared as Celery declares it (quorum, with its direct exchange and binding;
``app.amqp.queues``) once per connection. A lost connection is opened again and the publish
retried (at most twice); after any other failure the connection is closed, so that a late
confirm can never be taken for the next message's.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from typing import Any

from celery import Celery

from postroom.shared.celery_wire.task_message import TaskFraming

log = logging.getLogger("postroom.amqp")

#: publishes tried on a connection lost meanwhile, the first included
_ATTEMPTS = 3


class AmqpPublisher:
    """Publishes ``postroom.send_email`` jobs to ``queue`` on the RabbitMQ of ``app``'s
    broker URL. One connection per process (made again after a fork), one publish at a
    time on it."""

    def __init__(self, app: Celery, queue: str, confirm_timeout_s: float) -> None:
        self._app = app
        self._queue = queue
        self._confirm_timeout_s = confirm_timeout_s
        self._framing = TaskFraming(queue)
        self._lock = threading.Lock()
        self._connection: Any = None
        self._channel: Any = None
        self._pid = 0

    def publish(self, job: Mapping[str, Any], job_json: str | None = None) -> None:
        """Publish ``job`` and wait for RabbitMQ's confirm; raise when it does not come."""
        message = self._framing.amqp_message(job, job_json)
        with self._lock:
            for attempt in range(1, _ATTEMPTS + 1):
                try:
                    channel = self._channel_now()
                    channel.basic_publish(
                        message,
                        exchange="",
                        routing_key=self._queue,
                        confirm_timeout=self._confirm_timeout_s,
                    )
                    return
                except BaseException as exc:
                    # a confirm that did not come in time is not retried: the message
                    # may be queued (and a 503 then is a duplicate the ledger absorbs)
                    lost = isinstance(exc, self._recoverable())
                    lost = lost and not isinstance(exc, TimeoutError)
                    self._close()
                    if not lost or attempt == _ATTEMPTS:
                        raise
                    log.info("broker connection lost (%s); publishing again",
                             type(exc).__name__)  # fmt: skip

    def close(self) -> None:
        with self._lock:
            self._close()

    def _channel_now(self) -> Any:
        if self._channel is not None and self._pid == os.getpid():
            return self._channel
        self._connection = None  # a parent's connection is the parent's: never closed here
        # no AMQP heartbeats: nothing serves them between publishes, and RabbitMQ would
        # close an idle connection that promised them (a lost one fails the next publish)
        connection = self._app.connection_for_write(heartbeat=0)
        connection.ensure_connection(max_retries=1, interval_start=0, timeout=2)
        self._connection = connection
        channel = connection.channel()
        self._app.amqp.queues[self._queue](channel).declare()
        self._channel, self._pid = channel, os.getpid()
        return channel

    def _recoverable(self) -> tuple[type[BaseException], ...]:
        if self._connection is None:
            return (OSError,)
        return (*self._connection.recoverable_connection_errors, OSError)

    def _close(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None and self._pid == os.getpid():
            try:
                connection.close()
            except Exception:  # noqa: BLE001 - closing a broken connection may fail too
                log.debug("closing the broker connection failed", exc_info=True)
