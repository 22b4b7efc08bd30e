"""The Celery task: thin wiring around :class:`worker.sending.Attempt`."""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery, Task
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared.names import SEND_TASK
from worker.context import WorkerContext
from worker.sending import Attempt

log = logging.getLogger("postroom.worker")


def register(app: Celery, context: Any) -> Task:
    """Register ``postroom.send_email`` on ``app``; ``context()`` gives this process's
    :class:`WorkerContext` (built lazily, after the pool has forked)."""

    @app.task(
        name=SEND_TASK,
        bind=True,
        acks_late=True,
        reject_on_worker_lost=True,
        ignore_result=True,
        # a lost Redis connection while recording: let the broker redeliver the job;
        # the ledger makes the second run finish without sending again
        autoretry_for=(RedisConnectionError, RedisTimeoutError),
        retry_backoff=True,
        retry_backoff_max=60,
        max_retries=None,
    )
    def send_email(self: Task, job: dict[str, Any]) -> None:
        ctx: WorkerContext = context()
        Attempt(ctx, job).run()

    return send_email
