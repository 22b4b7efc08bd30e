"""The Celery task and the batch runner: thin wiring around
:class:`postroom.worker.sending.Attempt`.

Delivery from the broker is at least once: a message is acknowledged only when its attempt
has written the job's fate down (its document final, or the job parked in the schedule);
a pool process that dies loses none of its batch (:mod:`postroom.worker.batching`), and a whole
worker that dies leaves its messages in Redis's unacked table, from which they return after
``POSTROOM_VISIBILITY_TIMEOUT_S``. While postroom's own Redis does not answer, an attempt
waits in place (:class:`~postroom.worker.retrying.StorePatience`) and then hands the job back to
the queue.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from functools import partial

from celery import Celery, Task
from celery.exceptions import Reject
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError
from redis.exceptions import TimeoutError as RedisTimeoutError

from postroom.shared import keys
from postroom.shared.celery_wire.task_message import SEND_TASK
from postroom.shared.errors import InternalError
from postroom.shared.records import Job
from postroom.shared.settings import Settings
from postroom.worker import batching, budgets, metrics
from postroom.worker.batching import Item, fits_window, install
from postroom.worker.lanes import run_in_lanes, width_for
from postroom.worker.resources import WorkerContext
from postroom.worker.retrying import StorePatience
from postroom.worker.sending import Attempt

log = logging.getLogger("postroom.worker")

# postroom's Redis is down, restarting (LOADING is a ConnectionError), or failing over
STORE_ERRORS = (RedisConnectionError, RedisTimeoutError, ReadOnlyError)
#: times a message may end its pool process (alone in its batch) before it is given up
MAX_DEATHS = 3


def register(app: Celery, context: Callable[[], WorkerContext], settings: Settings) -> Task:
    """Register ``postroom.send_email`` on ``app``; ``context()`` gives this process's
    :class:`WorkerContext` (built lazily, after the pool has forked).

    The worker consumes it through :class:`postroom.worker.batching.BatchStrategy`, which hands
    the pool batches of queued jobs (:func:`run_batch`); the task body below is the same
    attempt for one job, run when the task is applied directly."""
    install(partial(run_batch_with, context, settings), partial(lost_with, context, settings))

    @app.task(
        name=SEND_TASK,
        shared=False,  # this app's alone: not added to every Celery app made after it
        bind=True,
        acks_late=True,
        reject_on_worker_lost=True,
        ignore_result=True,
        Strategy="postroom.worker.batching:BatchStrategy",
    )
    def send_email(self: Task, job: Job) -> None:
        if not run(context(), job):
            raise Reject("Redis unavailable", requeue=True)

    return send_email


def job_of(item: Item) -> Job:
    """The job of a message the strategy decoded (:mod:`postroom.worker.batching`)."""
    return item.job


def run_batch_with(
    context: Callable[[], WorkerContext], settings: Settings, items: list[Item]
) -> list[bool]:
    """Attempt the jobs of a batch, in up to ``Budgets.sends`` lanes at once
    (:mod:`postroom.worker.lanes`); for each job, whether to acknowledge its message (True) or put
    it back onto the queue (False): when postroom's Redis stays away, when the worker is
    shutting down, or when an attempt started now might outlast the broker's redelivery
    window."""
    ctx = context()
    ctx.warm()  # build the shared services before the lanes' threads use them
    width = width_for(ctx.pool.latency_s, budgets.current().sends)
    verdicts = run_in_lanes(items, width, partial(_run_lane, ctx, settings))
    ctx.pool.close_idle()
    metrics.connections(ctx.pool)
    return verdicts


def _run_lane(ctx: WorkerContext, settings: Settings, items: list[Item]) -> list[bool]:
    """Attempt each job of a lane in turn.

    Each attempt's last Redis step carries the next one's first (:attr:`Attempt.next`):
    one round trip per message and one more per lane, instead of two per message."""
    attempts = [Attempt(ctx, job_of(item)) for item in items]
    for attempt, item in zip(attempts, items, strict=True):
        attempt.ready = partial(_may_start, item, settings)
    verdicts: list[bool] = []
    store_down = False
    for n, attempt in enumerate(attempts):
        if store_down or not attempt.ready():
            _give_back(attempt)
            verdicts.append(False)
            continue
        attempt.next = attempts[n + 1] if n + 1 < len(items) else None
        done = run(ctx, attempt.job, close_idle=False, attempt=attempt)
        verdicts.append(done)
        store_down = not done
    return verdicts


def _may_start(item: Item, settings: Settings) -> bool:
    """Not while the worker stops, nor when the attempt might outlast the window."""
    return not batching.stopping() and fits_window(
        item, time.time(), settings.smtp_timeout_s, settings.visibility_timeout_s,
        settings.send_deadline_s,
    )


def _give_back(attempt: Attempt) -> None:
    """The attempt goes back to the queue unrun: free a lease begun for it ahead (when
    Redis does not answer, the lease runs out on its own)."""
    try:
        attempt.drop_ahead()
    except STORE_ERRORS:
        pass


def lost_with(context: Callable[[], WorkerContext], settings: Settings, item: Item) -> bool:
    """A message whose pool process died while it was that process's only work (run in the
    worker's main process). Counted in Redis, for every worker; the :data:`MAX_DEATHS`-th
    time it is given up: its document ends ``failed`` with an ``InternalError`` saying so
    (or as its ledger says, when every recipient is done), and True is returned."""
    ctx = context()
    job = job_of(item)
    key = keys.deaths(job["solution_id"], job["task_id"])
    pipe = ctx.state.pipeline(transaction=True)
    pipe.incr(key)
    pipe.expire(key, settings.result_ttl)
    deaths = int(pipe.execute()[0])
    if deaths < MAX_DEATHS:
        return False
    Attempt(ctx, job).give_up(InternalError(
        f"the worker's process ended {deaths} times while sending this message; "
        "it is not tried again"
    ))  # fmt: skip
    return True


def run(
    ctx: WorkerContext,
    job: Job,
    close_idle: bool = True,
    attempt: Attempt | None = None,
) -> bool:
    """One delivery attempt of ``job``; running it again is always safe (ledger, lease).

    True when the job's fate is written down (its message may be acknowledged); False when
    postroom's Redis stayed away past :class:`StorePatience` (the message goes back onto
    the queue). An unexpected error marks the document ``failed`` and counts as written.
    """
    attempt = attempt or Attempt(ctx, job)
    waits = StorePatience.from_settings(ctx.settings).waits()
    while True:
        try:
            attempt.run()
            if close_idle:
                ctx.pool.close_idle()
                metrics.connections(ctx.pool)
            return True
        except STORE_ERRORS:
            wait = next(waits, None)
            if wait is None:
                log.warning("Redis still unavailable; the job goes back to the queue",
                            extra=attempt.log_extra)
                return False
            log.warning("Redis unavailable; waiting", extra=attempt.log_extra)
            time.sleep(wait)
        except Exception as exc:
            log.exception("unexpected error; the message is marked failed",
                          extra=attempt.log_extra)
            try:
                attempt.crashed(exc)
            except STORE_ERRORS:
                return False
            return True
