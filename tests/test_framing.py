"""The API's own framing of Celery messages matches what Celery's ``send_task`` writes."""

from __future__ import annotations

import base64
import json
from typing import Any

import redis

from shared import keys
from shared.framing import TaskFraming
from shared.queue import Enqueuer, make_producer
from tests.helpers import as_bytes, make_settings

JOB = {"task_id": "7d0c7a52-1", "solution_id": "acme", "message": {"to": ["a@example.com"]}}


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
    from shared.queue import make_enqueuer

    settings = make_settings(redis_url)
    enqueuer = make_enqueuer(settings, real_redis)
    enqueuer.enqueue(JOB, with_writes=lambda pipe: pipe.set("postroom:test:doc", "1"))
    assert real_redis.get("postroom:test:doc") == b"1"
    assert real_redis.zcard(keys.accepted()) == 1
    pushed = _decoded(as_bytes(real_redis.rpop(settings.queue)))
    assert pushed["body"][1] == {"job": JOB}
    assert pushed["headers"]["task"] == "postroom.send_email"
