"""Celery's task message as postroom encodes and decodes it (``shared/celery_wire/
task_message.py``): the framing matches what Celery's ``send_task`` writes, a framed message
is one Celery's own worker runs, and one ``send_task`` writes is one postroom decodes."""

from __future__ import annotations

import base64
import json
from typing import Any, cast

import redis

from postroom.shared import keys
from postroom.shared.celery_wire.task_message import (
    SEND_TASK,
    TaskFraming,
    decode_message,
    job_of,
)
from postroom.shared.queue import Enqueuer, make_producer
from postroom.shared.records import Job
from tests.helpers import as_bytes, make_settings
from tests.stack import wait_for

JOB = cast(Job, {"task_id": "7d0c7a52-1", "solution_id": "acme",
                 "message": {"to": ["a@example.com"]}})


def _decoded(raw: bytes) -> dict[str, Any]:
    message: dict[str, Any] = json.loads(raw)
    message["body"] = json.loads(base64.b64decode(message["body"]))
    return message


def test_framing_equals_celerys_send_task(real_redis: redis.Redis, redis_url: str) -> None:
    """Field for field, a framed message is what the installed Celery's ``send_task``
    pushes on a Redis broker; only the per-message delivery tag and the per-process
    origin and reply address differ."""
    settings = make_settings(redis_url)
    Enqueuer(make_producer(settings), settings.queue).enqueue(JOB)
    celerys = _decoded(as_bytes(real_redis.rpop(settings.queue)))
    ours = _decoded(TaskFraming(settings.queue).frame(JOB).encode())

    for message in (celerys, ours):
        message["properties"].pop("delivery_tag")
        message["properties"].pop("reply_to")
        message["headers"].pop("origin")
    assert celerys == ours


def test_direct_enqueue_is_one_transaction(real_redis: redis.Redis, redis_url: str) -> None:
    """With the broker in postroom's own Redis, the job, its accepted-set entry and the
    caller's writes land together, and the job is what the framing makes of it."""
    from postroom.shared.queue import make_enqueuer

    settings = make_settings(redis_url)
    enqueuer = make_enqueuer(settings, real_redis)
    enqueuer.enqueue(JOB, with_writes=lambda pipe: pipe.set("postroom:test:doc", "1"))
    assert real_redis.get("postroom:test:doc") == b"1"
    assert real_redis.zcard(keys.accepted()) == 1
    pushed = _decoded(as_bytes(real_redis.rpop(settings.queue)))
    assert pushed["body"][1] == {"job": JOB}
    assert pushed["headers"]["task"] == "postroom.send_email"


def test_a_framed_message_is_json_whatever_the_names_and_the_jobs_spelling() -> None:
    """The template holds names with ``%``, quotes and backslashes as they are; a job given
    as JSON already (the accepted set's spelling) frames to the same decoded message."""
    framing = TaskFraming('q%s"\\x', task_name="t%(body)s")
    job = {**JOB, "task_id": 'id"%\\', "message": {"to": ["ä@example.com"], "text": "%(x)s"}}
    plain = _decoded(framing.frame(job).encode())
    given = _decoded(framing.frame(job, json.dumps(job, sort_keys=True)).encode())
    for message in (plain, given):
        assert [[], {"job": job}, {"callbacks": None, "errbacks": None, "chain": None,
                                   "chord": None}] == message["body"]  # fmt: skip
        assert ('q%s"\\x', "t%(body)s", 'id"%\\') == (
            message["properties"]["delivery_info"]["routing_key"],
            message["headers"]["task"],
            message["headers"]["id"],
        )
        assert job["task_id"] == message["properties"]["correlation_id"]
    assert plain["properties"].pop("delivery_tag") != given["properties"].pop("delivery_tag")
    assert plain == given


def test_a_message_celerys_send_task_writes_is_one_we_decode(
    real_redis: redis.Redis, redis_url: str
) -> None:
    """What the installed Celery's ``send_task`` pushes on a Redis broker decodes to the
    job: as stored (``job_of``) and as kombu delivers it to the strategy
    (``decode_message``)."""
    from kombu import Connection

    settings = make_settings(redis_url)
    Enqueuer(make_producer(settings), settings.queue).enqueue(JOB)
    raw = as_bytes(real_redis.rpop(settings.queue))
    assert JOB == job_of(raw)
    with Connection(redis_url) as conn:
        delivered = conn.default_channel.message_to_python(json.loads(raw))
        assert JOB == decode_message(delivered)


def test_a_message_we_frame_is_one_celerys_own_worker_runs(
    real_redis: redis.Redis, redis_url: str
) -> None:
    """A message framed here and pushed on the queue's list is run by Celery's own worker
    (its consumer, its default strategy and request: not postroom's) as the task
    ``postroom.send_email`` with the job as its keyword argument ``job``."""
    from celery import Celery
    from celery.contrib.testing.worker import start_worker

    queue = "roundtrip"
    app = Celery("roundtrip", broker=redis_url, set_as_current=False)
    app.conf.update(task_default_queue=queue, task_ignore_result=True,
                    worker_hijack_root_logger=False)
    ran: list[dict[str, Any]] = []

    @app.task(name=SEND_TASK, shared=False)
    def send_email(job: dict[str, Any]) -> None:
        ran.append(job)

    framing = TaskFraming(queue)
    real_redis.lpush(queue, framing.frame(JOB))
    with start_worker(app, pool="solo", perform_ping_check=False, loglevel="WARNING",
                      shutdown_timeout=10.0):
        wait_for(lambda: bool(ran), 20, message="Celery's worker to run the framed message")
    assert [JOB] == ran
