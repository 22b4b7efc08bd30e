"""Moving queued send jobs from a Redis broker to the broker in use now.

When a deployment changes ``POSTROOM_BROKER_URL`` (from its Redis to RabbitMQ, say), the
jobs still waiting on the old Redis broker are moved by ``postroom queue move --from
<old broker URL>`` (run after the old workers have stopped and the new ones started):

- each message waiting in the old queue's list is moved, one at a time, to a list of its
  own (``<queue>.moving``, atomically: ``LMOVE``), published to the current broker
  (confirmed, on RabbitMQ), then removed from that list. A move cut short leaves the
  message in the queue or in ``<queue>.moving``, and the next run publishes it again;
- the old workers' unacknowledged messages (kombu's ``unacked`` hash: reserved by a
  worker that stopped without handing them back) are moved too, unless told not to.

A message published twice is still sent once: a worker that meets it again finds its
ledger and document final. Messages that are not ``postroom.send_email`` jobs are set
aside in ``<queue>.unknown``. Retries and deferred sends wait in postroom's own schedule (in
``POSTROOM_REDIS_URL``), never in the broker, so nothing else needs moving.

The format read is kombu's Redis transport's (:mod:`postroom.shared.celery_wire`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from postroom.shared.celery_wire.redis_transport import UNACKED, UNACKED_INDEX, unacked_message
from postroom.shared.celery_wire.task_message import job_of
from postroom.shared.records import Job


@dataclass(frozen=True)
class Moved:
    queued: int
    unacked: int
    skipped: int


def move_jobs(
    source: redis.Redis,
    queue: str,
    publish: Callable[[Job], None],
    include_unacked: bool = True,
) -> Moved:
    """Move every send job waiting in ``source`` (a Redis broker) for ``queue`` through
    ``publish`` (which raises when the broker does not take a job: the job stays put)."""
    moving = f"{queue}.moving"
    queued = skipped = 0
    # what an earlier, interrupted run left half moved comes first
    while True:
        raw: Any = source.lindex(moving, -1) or source.lmove(queue, moving, "RIGHT", "LEFT")
        if raw is None:
            break
        job = job_of(raw)
        if job is None:
            source.lmove(moving, f"{queue}.unknown", "RIGHT", "LEFT")
            skipped += 1
            continue
        publish(job)
        source.lrem(moving, -1, raw)
        queued += 1
    unacked = 0
    if include_unacked:
        for tag, entry in source.hgetall(UNACKED).items():
            raw_message, routing_key = unacked_message(entry)
            job = job_of(raw_message)
            if routing_key != queue or job is None:
                continue
            publish(job)
            pipe = source.pipeline(transaction=True)
            pipe.hdel(UNACKED, tag)
            pipe.zrem(UNACKED_INDEX, tag)
            pipe.execute()
            unacked += 1
    return Moved(queued, unacked, skipped)
