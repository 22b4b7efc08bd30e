"""Broker messages the worker cannot read are set aside in Redis, never dropped.

A message on the queue that is not a postroom job (a body that is not JSON, a protocol-2
body without a job, a task name this worker does not know, a content type it does not
accept) cannot be sent, and handing it out again would only fail again. It is written to
the list :func:`postroom.shared.keys.dead_letters` (in ``POSTROOM_REDIS_URL``), logged, and counted
in ``postroom_worker_dead_letters_total``; only then is it acknowledged. When even Redis
cannot take it, the message is left unacknowledged: the broker hands it out again after
its redelivery window.

Two places find such messages: :class:`postroom.worker.batching.BatchStrategy` (a
``postroom.send_email`` message whose body holds no job,
:func:`postroom.shared.celery_wire.task_message.decode_message`) and Celery's consumer, whose
handlers of unknown, invalid and undecodable messages reject or acknowledge them without
a trace; :class:`Consumer` replaces those handlers (``worker_consumer``).

Both find the settings and the metric's counter in the app's configuration
(``postroom_settings``, ``postroom_dead_letter_counted``:
:func:`postroom.worker.metrics.dead_letter`,
set by ``worker/app.py``).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

import redis
from celery.worker.consumer import Consumer as CeleryConsumer

from postroom.shared import keys
from postroom.shared.redis_client import redis_client
from postroom.shared.settings import Settings

log = logging.getLogger("postroom.worker")

#: the most bytes of a message body kept in its entry (the rest is cut, and says so)
BODY_MAX = 64 * 1024


def entry(message: Any, reason: str, error: BaseException | None = None) -> str:
    """The JSON kept for ``message`` (a kombu message): when, why, its headers and body."""
    body = getattr(message, "body", b"")
    if isinstance(body, (bytes, bytearray, memoryview)):
        text = bytes(body).decode("utf-8", errors="replace")
    else:
        text = body if isinstance(body, str) else repr(body)
    cut = len(text) > BODY_MAX
    record = {
        "at": time.time(),
        "reason": reason,
        "error": None if error is None else f"{type(error).__name__}: {error}"[:500],
        "headers": _jsonable(getattr(message, "headers", None) or {}),
        "content_type": getattr(message, "content_type", None),
        "body": text[:BODY_MAX],
        "body_cut": cut,
    }
    return json.dumps(record, default=repr)


def _jsonable(headers: Any) -> Any:
    try:
        return json.loads(json.dumps(headers, default=repr))
    except (TypeError, ValueError):
        return repr(headers)


class DeadLetters:
    """Writes entries to the dead-letter list through one lazily made Redis client."""

    def __init__(
        self,
        client: Callable[[], redis.Redis],
        counted: Callable[[str], None] | None = None,
    ) -> None:
        self._make = client
        self._client: redis.Redis | None = None
        self._counted = counted

    @classmethod
    def for_settings(
        cls, settings: Settings, counted: Callable[[str], None] | None = None
    ) -> DeadLetters:
        return cls(lambda: redis_client(settings.redis_url, socket_timeout=5.0), counted)

    @classmethod
    def for_app(cls, app: Any) -> DeadLetters:
        """For the worker's Celery ``app``: its settings and its metric's counter."""
        conf = app.conf
        return cls.for_settings(conf["postroom_settings"],
                                conf.get("postroom_dead_letter_counted"))

    def set_aside(self, message: Any, reason: str, error: BaseException | None = None) -> bool:
        """Keep ``message`` in the list; True when it is kept (the caller may then
        acknowledge it), False when Redis failed (the caller leaves it unacknowledged)."""
        headers = getattr(message, "headers", None) or {}
        task_id = headers.get("id") if isinstance(headers, dict) else None
        try:
            if self._client is None:
                self._client = self._make()
            self._client.lpush(keys.dead_letters(), entry(message, reason, error))
        except redis.RedisError as exc:
            log.critical("could not set aside a message the worker cannot read (%s, task "
                         "id %s): %r; it stays unacknowledged and comes back after the "
                         "redelivery window", reason, task_id, exc)
            return False
        log.error("a message the worker cannot read (%s%s, task id %s) was set aside in "
                  "%s", reason, "" if error is None else f": {type(error).__name__}",
                  task_id, keys.dead_letters())
        if self._counted is not None:
            self._counted(reason)
        return True


class Consumer(CeleryConsumer):
    """Celery's consumer, whose messages it cannot read are set aside, not dropped
    (Celery rejects unknown and invalid ones and acknowledges undecodable ones)."""

    _dead_letters: DeadLetters | None = None

    def _set_aside(self, message: Any, reason: str, exc: BaseException | None) -> None:
        if self._dead_letters is None:
            self._dead_letters = DeadLetters.for_app(self.app)
        if self._dead_letters.set_aside(message, reason, exc):
            message.ack_log_error(log, self.connection_errors)

    def on_unknown_message(self, body: Any, message: Any) -> None:
        self._set_aside(message, "unknown message format", None)

    def on_unknown_task(self, body: Any, message: Any, exc: BaseException) -> None:
        self._set_aside(message, "unknown task", exc)

    def on_invalid_task(self, body: Any, message: Any, exc: BaseException) -> None:
        self._set_aside(message, "invalid task", exc)

    def on_decode_error(self, message: Any, exc: BaseException) -> None:
        self._set_aside(message, "undecodable body", exc)
