"""The Celery task: thin wiring around :class:`worker.sending.Attempt`.

Delivery from the broker is at least once: the message is acknowledged only when the task
returns (``acks_late``), a pool child that dies puts it back at once
(``reject_on_worker_lost``), and a whole worker that dies leaves it in Redis's unacked
table, from which it returns after ``POSTROOM_VISIBILITY_TIMEOUT_S``. The task therefore
returns only once the job's fate is written down: its document final, or the job parked in
the schedule. While postroom's own Redis does not answer, it waits in place
(:class:`~worker.retrying.StorePatience`) and then hands the job back to the queue.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from celery import Celery, Task
from celery.exceptions import Reject
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared.names import SEND_TASK
from worker.context import WorkerContext
from worker.retrying import StorePatience
from worker.sending import Attempt

log = logging.getLogger("postroom.worker")

# postroom's Redis is down, restarting (LOADING is a ConnectionError), or failing over
STORE_ERRORS = (RedisConnectionError, RedisTimeoutError, ReadOnlyError)


def register(app: Celery, context: Any) -> Task:
    """Register ``postroom.send_email`` on ``app``; ``context()`` gives this process's
    :class:`WorkerContext` (built lazily, after the pool has forked)."""

    @app.task(
        name=SEND_TASK,
        bind=True,
        acks_late=True,
        reject_on_worker_lost=True,
        ignore_result=True,
    )
    def send_email(self: Task, job: dict[str, Any]) -> None:
        run(context(), job)

    return send_email


def run(ctx: WorkerContext, job: dict[str, Any]) -> None:
    """One delivery attempt of ``job``; running it again is always safe (ledger, lease)."""
    attempt = Attempt(ctx, job)
    waits = StorePatience.from_settings(ctx.settings).waits()
    while True:
        try:
            attempt.run()
            ctx.pool.close_idle()
            return
        except STORE_ERRORS as exc:
            wait = next(waits, None)
            if wait is None:
                log.warning("Redis still unavailable; the job goes back to the queue",
                            extra=attempt.log_extra)
                raise Reject(type(exc).__name__, requeue=True) from exc
            log.warning("Redis unavailable; waiting", extra=attempt.log_extra)
            time.sleep(wait)
        except Exception as exc:
            log.exception("unexpected error; the message is marked failed",
                          extra=attempt.log_extra)
            try:
                attempt.crashed(exc)
            except STORE_ERRORS:
                raise Reject(type(exc).__name__, requeue=True) from exc
            raise
