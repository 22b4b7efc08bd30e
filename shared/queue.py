"""The broker side both processes share: Celery configuration and enqueueing by name.

The intake API never imports the worker: it publishes ``postroom.send_email`` by name
through a Celery app that has a broker and no result backend (a result backend would
subscribe the producer to every task's result channel).

Every job published is also kept in the *accepted set* (``keys.accepted()``) until its task
document is final. The broker can drop a job in one place no acknowledgement covers: kombu's
Redis transport pops a job from the queue and records it as unacknowledged in two steps,
and a Redis that dies between them has lost it. The accepted set is the record that
outlives that: a job that stays accepted while nothing holds it (not final, not leased, not
scheduled) for a whole redelivery window is published again by the workers' watcher.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import redis
from celery import Celery
from kombu.exceptions import KombuError, OperationalError
from redis.exceptions import RedisError

from postroom.shared import keys
from postroom.shared.brokers import PUBLISH_ERRORS, broker_config, is_amqp, publish_options
from postroom.shared.celery_wire.amqp_publisher import AmqpPublisher
from postroom.shared.celery_wire.task_message import SEND_TASK, TaskFraming, redacted
from postroom.shared.connections import same_redis
from postroom.shared.errors import ServiceUnavailable
from postroom.shared.records import Job
from postroom.shared.redis_client import redis_client
from postroom.shared.settings import Settings

log = logging.getLogger("postroom.queue")


def celery_config(settings: Settings) -> dict[str, Any]:
    """Configuration common to the producer (API) and the consumer (worker)."""
    transport: dict[str, Any] = {}
    if settings.broker_url.startswith(("redis://", "rediss://", "unix://", "sentinel://")):
        transport = {
            # a message is redelivered when not acknowledged within this window; it is
            # longer than the longest send (the worker checks it at start-up)
            "visibility_timeout": settings.visibility_timeout_s,
            # how often each worker looks for messages whose window has passed (those of a
            # worker that died outright): every few seconds, with no throttling, so they
            # come back soon after the window rather than up to 100 s later
            "unacked_restore_interval": restore_interval_s(settings.visibility_timeout_s),
            "unacked_restore_throttle": 1,
            "socket_connect_timeout": 2.0,
            "socket_timeout": 5.0,
            "retry_on_timeout": True,
            "health_check_interval": 25,
        }
    config = {
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
        "postroom_confirm_timeout_s": settings.broker_confirm_timeout_s,
    }
    # RabbitMQ (quorum queues, publisher confirms) and Sentinel: shared/brokers.py
    config.update(broker_config(settings.broker_url, settings.redis_url,
                                settings.broker_master_name, transport))  # fmt: skip
    return config


def restore_interval_s(visibility_timeout_s: int) -> int:
    """Seconds between sweeps for messages to redeliver: a tenth of the window, 1 to 10."""
    return max(1, min(10, visibility_timeout_s // 10))


def make_producer(settings: Settings) -> Celery:
    app = Celery("postroom-api", set_as_current=False)
    app.conf.update(celery_config(settings))
    # an API process serves no AMQP heartbeats between requests: its connection would be
    # closed by RabbitMQ while idle (the workers keep theirs, to be noticed when lost)
    app.conf.broker_heartbeat = 0
    return app


# -- sorted sets of jobs ----------------------------------------------------------------

# KEYS[1] a sorted set (member = job JSON, score = a time in seconds)
# ARGV[1] now (seconds), ARGV[2] how many at most, ARGV[3] the claim's length in seconds
# Returns {claim score, member...}: the members due at now, each re-scored to the claim
# score (now + claim) so no other process takes it meanwhile.
_CLAIM_DUE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local until_ts = string.format('%.17g', tonumber(ARGV[1]) + tonumber(ARGV[3]))
for _, member in ipairs(due) do
  redis.call('ZADD', KEYS[1], until_ts, member)
end
table.insert(due, 1, until_ts)
return due
"""

# KEYS[1] the sorted set; ARGV[1] the member; ARGV[2] the claim score it was given
# Removes the member only if it still has that score (nobody added it again since).
_DONE = """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and tonumber(score) == tonumber(ARGV[2]) then
  return redis.call('ZREM', KEYS[1], ARGV[1])
end
return 0
"""


@dataclass(frozen=True)
class Claimed:
    """A due job taken by one process for a while; hand it back to :meth:`JobSet.done`."""

    member: str
    score: str
    job: Job


def encode_job(job: Mapping[str, Any]) -> str:
    """The one spelling of a job as a member: the same job is always the same member."""
    return json.dumps(job, sort_keys=True, separators=(",", ":"))


class JobSet:
    """Jobs in a Redis sorted set, each with a time; due ones are *claimed* (pushed
    ``claim_s`` into the future) so that of several processes one takes each."""

    def __init__(self, client: redis.Redis, key: str, claim_s: float) -> None:
        self._r = client
        self.key = key
        self.claim_s = claim_s
        self._claim = client.register_script(_CLAIM_DUE)
        self._done = client.register_script(_DONE)

    def add(
        self,
        job: Mapping[str, Any],
        due_ts: float,
        with_writes: Callable[[Any], None] | None = None,
    ) -> None:
        """Add ``job`` due at ``due_ts`` (a job already there only gets the new time);
        ``with_writes(pipeline)`` adds other writes to the same round trip."""
        pipe = self._r.pipeline(transaction=False)
        self.add_to(pipe, job, due_ts)
        if with_writes is not None:
            with_writes(pipe)
        pipe.execute()

    def add_to(self, pipe: Any, job: Mapping[str, Any], due_ts: float) -> None:
        """Queue the addition of ``job`` on ``pipe`` (a pipeline of this set's Redis)."""
        pipe.zadd(self.key, {encode_job(job): due_ts})

    def pipeline(self, transaction: bool = True) -> Any:
        """A pipeline of this set's Redis."""
        return self._r.pipeline(transaction=transaction)

    def claim_due(self, now: float, limit: int = 100) -> list[Claimed]:
        """The jobs due at ``now`` (at most ``limit``), claimed for ``claim_s``."""
        score, *members = self._claim(keys=[self.key], args=[now, limit, self.claim_s])
        return [Claimed(m.decode(), score.decode(), cast(Job, json.loads(m))) for m in members]

    def done(self, claimed: Claimed) -> bool:
        """Remove a claimed job, unless it was added again since it was claimed."""
        return bool(self._done(keys=[self.key], args=[claimed.member, claimed.score]))

    def remove(self, job: Mapping[str, Any]) -> None:
        self._r.zrem(self.key, encode_job(job))

    def due_at(self, job: Mapping[str, Any]) -> float | None:
        """When ``job`` is due, or None when it is not in the set."""
        score = self._r.zscore(self.key, encode_job(job))
        return None if score is None else float(score)

    def size(self) -> int:
        return int(self._r.zcard(self.key))


def accepted_jobs(client: redis.Redis, settings: Settings) -> JobSet:
    """The accepted set: jobs not yet final, each checked a redelivery window after it was
    last published (by the watcher of :mod:`postroom.worker.schedule`)."""
    return JobSet(client, keys.accepted(), float(settings.visibility_timeout_s))


#: what a publish that did not reach the broker (or was not confirmed by it) raises
_PUBLISH_FAILURES: tuple[type[BaseException], ...] = (
    OperationalError, KombuError, RedisError, OSError, *PUBLISH_ERRORS
)
_PUBLISH_RETRY = {"max_retries": 2, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5}


@dataclass(frozen=True)
class DirectBroker:
    """Publishing by pushing framed messages straight onto a Redis broker's queue list
    (see :mod:`postroom.shared.celery_wire.task_message`). ``shares_state``: the broker is
    postroom's own Redis, so a job, its accepted-set entry and the caller's writes go in one
    transaction."""

    client: redis.Redis
    framing: TaskFraming
    shares_state: bool


def unavailable(exc: BaseException) -> ServiceUnavailable:
    """The 503 a send gets when the broker (or the Redis that holds its job) fails it."""
    log.warning("broker unavailable: %s", type(exc).__name__)
    return ServiceUnavailable("the queue is unavailable; nothing was accepted, please retry")


@dataclass(frozen=True)
class OneStep:
    """What a script needs to queue a job itself, in the same atomic step as other writes
    (the broker is postroom's own Redis): the queue's list, the job framed as the broker
    holds it, and its accepted-set entry. See ``api/intake/one_step.py``.

    With ``publish`` (the broker is RabbitMQ), the script writes everything but the job,
    and the caller then publishes the job with ``publish`` (raising ServiceUnavailable when
    the broker does not confirm it)."""

    queue: str
    framing: TaskFraming
    accepted: JobSet
    publish: Callable[[Job], None] | None = None

    def message(self, job: Job, member: str) -> str:
        """What the script pushes on the queue for ``job``: "" when it is published apart."""
        return "" if self.publish is not None else self.framing.frame(job, member)

    def entry(self, job: Job) -> tuple[str, float]:
        """The accepted-set member and score of ``job``, as :meth:`Enqueuer.enqueue` adds it."""
        return encode_job(job), time.time() + self.accepted.claim_s


class Enqueuer:
    """Publishes send jobs; a broker that does not take one raises ServiceUnavailable.

    With ``accepted``, each job is first recorded in the accepted set (due for a check a
    redelivery window later), and taken out again when the broker refuses it. With
    ``direct``, jobs are pushed onto the Redis broker's list without Celery's producer."""

    def __init__(
        self,
        app: Celery,
        queue: str,
        accepted: JobSet | None = None,
        direct: DirectBroker | None = None,
    ) -> None:
        self._app = app
        self._queue = queue
        self._accepted = accepted
        self._direct = direct
        broker_url = str(app.conf.broker_url)
        confirm_timeout_s = float(app.conf.get("postroom_confirm_timeout_s", 5.0))
        self._publish_options = publish_options(broker_url, confirm_timeout_s)
        # on RabbitMQ a job is framed here and published over a kept connection, cheaper
        # at intake than send_task (docs/throughput.md)
        self._amqp = AmqpPublisher(app, queue, confirm_timeout_s) if is_amqp(broker_url) else None

    def one_step(self) -> OneStep | None:
        """The parts for queueing a job inside a script, when the broker's queue and the
        accepted set are in the same Redis, or for writing all but the job in a script and
        publishing it after, on RabbitMQ (None otherwise)."""
        direct, accepted = self._direct, self._accepted
        if accepted is None:
            return None
        if direct is not None and direct.shares_state:
            return OneStep(direct.framing.queue, direct.framing, accepted)
        if self._amqp is not None:  # the script writes the rest; the job is published after
            return OneStep(self._queue, TaskFraming(self._queue), accepted, self.publish)
        return None

    def publish(self, job: Job) -> None:
        """Publish ``job`` alone (its document and accepted-set entry are written already);
        ServiceUnavailable when the broker does not take it."""
        self._publish(job, None)

    def enqueue(
        self,
        job: Job,
        countdown: float | None = None,
        with_writes: Callable[[Any], None] | None = None,
    ) -> None:
        """Publish ``job``. ``with_writes(pipeline)`` adds writes that must be in Redis
        before the job is published to the same round trip as the accepted-set entry
        (only with an accepted set; else the caller writes them itself)."""
        accepted = self._accepted
        if with_writes is not None and accepted is None:
            raise ValueError("with_writes needs an accepted set")
        direct = self._direct if countdown is None else None
        if direct is not None and direct.shares_state and accepted is not None:
            self._in_one_transaction(job, direct, accepted, with_writes)
            return
        if accepted is not None:
            try:
                accepted.add(job, time.time() + accepted.claim_s, with_writes)
            except (RedisError, OSError) as exc:
                raise unavailable(exc) from None
        try:
            if direct is not None:
                self._push(job, direct)
            else:
                self._publish(job, countdown)
        except ServiceUnavailable:
            if accepted is not None:
                try:
                    accepted.remove(job)
                except (RedisError, OSError):
                    log.warning("could not withdraw a job the broker refused")
            raise

    def schedule(
        self,
        job: Job,
        due_ts: float,
        with_writes: Callable[[Any], None] | None = None,
    ) -> None:
        """Park ``job`` until ``due_ts`` in the schedule of retries (``keys.schedule()``,
        moved onto the queue by the workers' mover), with its accepted-set entry due a
        redelivery window after that and ``with_writes``, in one transaction."""
        accepted = self._accepted
        if accepted is None:
            raise ValueError("scheduling needs an accepted set")
        pipe = accepted.pipeline(transaction=True)
        accepted.add_to(pipe, job, due_ts + accepted.claim_s)
        pipe.zadd(keys.schedule(), {encode_job(job): due_ts})
        if with_writes is not None:
            with_writes(pipe)
        try:
            pipe.execute()
        except (RedisError, OSError) as exc:
            raise unavailable(exc) from None

    def _in_one_transaction(
        self,
        job: Job,
        direct: DirectBroker,
        accepted: JobSet,
        with_writes: Callable[[Any], None] | None,
    ) -> None:
        pipe = direct.client.pipeline(transaction=True)
        accepted.add_to(pipe, job, time.time() + accepted.claim_s)
        if with_writes is not None:
            with_writes(pipe)
        pipe.lpush(direct.framing.queue, direct.framing.frame(job))
        try:
            pipe.execute()
        except (RedisError, OSError) as exc:
            raise unavailable(exc) from None

    def _push(self, job: Job, direct: DirectBroker) -> None:
        try:
            direct.client.lpush(direct.framing.queue, direct.framing.frame(job))
        except (RedisError, OSError) as exc:
            raise unavailable(exc) from None

    def _publish(self, job: Job, countdown: float | None) -> None:
        if self._amqp is not None and countdown is None:
            try:
                self._amqp.publish(job)
            except _PUBLISH_FAILURES as exc:
                raise unavailable(exc) from None
            return
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
                **self._publish_options,
            )
        except _PUBLISH_FAILURES as exc:
            raise unavailable(exc) from None

    def ping(self) -> bool:
        """Whether the broker answers now."""
        try:
            with self._app.connection_for_write() as conn:
                conn.ensure_connection(max_retries=1, interval_start=0, timeout=2)
            return True
        except (OperationalError, KombuError, RedisError, OSError):
            return False


def make_enqueuer(settings: Settings, state: redis.Redis) -> Enqueuer:
    """The API's enqueuer: a producer app, the accepted set in ``state`` (the Redis of
    ``POSTROOM_REDIS_URL``) and, on a Redis broker, direct publishing."""
    direct = None
    if same_redis(settings.broker_url, settings.redis_url):
        direct = DirectBroker(state, TaskFraming(settings.queue), shares_state=True)
    elif settings.broker_url.startswith(("redis://", "rediss://")):
        client = redis_client(settings.broker_url)
        direct = DirectBroker(client, TaskFraming(settings.queue), shares_state=False)
    return Enqueuer(
        make_producer(settings), settings.queue, accepted_jobs(state, settings), direct
    )
