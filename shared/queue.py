"""The broker side both processes share: Celery configuration and enqueueing by name.

The intake API never imports the worker: it publishes ``postroom.send_email`` by name
through a Celery app that has a broker and no result backend (a result backend would
subscribe the producer to every task's result channel).
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery
from kombu.exceptions import KombuError, OperationalError
from redis.exceptions import RedisError

from shared.errors import ServiceUnavailable
from shared.names import SEND_TASK
from shared.settings import Settings

log = logging.getLogger("postroom.queue")


def celery_config(settings: Settings) -> dict[str, Any]:
    """Configuration common to the producer (API) and the consumer (worker)."""
    transport: dict[str, Any] = {}
    if settings.broker_url.startswith(("redis://", "rediss://", "unix://")):
        transport = {
            # a message is redelivered when not acknowledged within this window; it is
            # far longer than the longest send (SMTP timeouts are much shorter)
            "visibility_timeout": settings.visibility_timeout_s,
            "socket_connect_timeout": 2.0,
            "socket_timeout": 5.0,
            "retry_on_timeout": True,
            "health_check_interval": 25,
        }
    return {
        "broker_url": settings.broker_url,
        "broker_transport_options": transport,
        "broker_connection_timeout": 2.0,
        "broker_connection_retry_on_startup": True,
        "result_backend": None,
        "task_ignore_result": True,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "task_default_queue": settings.queue,
        "task_create_missing_queues": True,
        "enable_utc": True,
    }


def make_producer(settings: Settings) -> Celery:
    app = Celery("postroom-api", set_as_current=False)
    app.conf.update(celery_config(settings))
    return app


_PUBLISH_RETRY = {"max_retries": 2, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5}


def redacted(job: dict[str, Any]) -> str:
    """What Celery may print of a job: ids only, never addresses, bodies or passwords."""
    return repr({"task_id": job.get("task_id"), "solution_id": job.get("solution_id")})


class Enqueuer:
    """Publishes send jobs; a broker that does not take one raises ServiceUnavailable."""

    def __init__(self, app: Celery, queue: str) -> None:
        self._app = app
        self._queue = queue

    def enqueue(self, job: dict[str, Any], countdown: float | None = None) -> None:
        try:
            self._app.send_task(
                SEND_TASK,
                kwargs={"job": job},
                task_id=job["task_id"],
                queue=self._queue,
                retry=True,
                retry_policy=_PUBLISH_RETRY,
                argsrepr="()",
                kwargsrepr=redacted(job),
                countdown=countdown,
            )
        except (OperationalError, KombuError, RedisError, OSError) as exc:
            log.warning("broker unavailable: %s", type(exc).__name__)
            raise ServiceUnavailable(
                "the queue is unavailable; nothing was accepted, please retry"
            ) from None

    def ping(self) -> bool:
        """Whether the broker answers now."""
        try:
            with self._app.connection_for_write() as conn:
                conn.ensure_connection(max_retries=1, interval_start=0, timeout=2)
            return True
        except (OperationalError, KombuError, RedisError, OSError):
            return False
