"""The intake's own publishing to RabbitMQ (``shared/amqp_publisher.py``) on a real server:
the message is what Celery's ``send_task`` publishes, confirmed, over a kept connection."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from kombu import Connection

from shared.amqp_publisher import AmqpPublisher
from shared.queue import Enqueuer, make_producer
from tests.helpers import make_settings
from tests.topologies import Rabbit

JOB = {"task_id": "7d0c7a52-1", "solution_id": "acme", "message": {"to": ["a@example.com"]}}


@pytest.fixture
def queue(rabbit: Rabbit) -> Iterator[str]:
    name = rabbit.new_queue()
    yield name
    rabbit.delete_queues()


def _take(url: str, queue: str) -> list[Any]:
    """Every message waiting on ``queue``, taken off it."""
    taken = []
    with Connection(url, connect_timeout=2) as conn:
        channel = conn.channel()
        while (message := channel.basic_get(queue, no_ack=True)) is not None:
            taken.append(message)
    return taken


def _comparable(message: Any) -> dict[str, Any]:
    properties = dict(message.properties)
    headers = dict(properties.pop("application_headers"))
    for per_process in ("origin", "x-delivery-count"):
        headers.pop(per_process, None)
    properties.pop("reply_to")
    return {"body": json.loads(message.body), "headers": headers, "properties": properties}


def test_our_message_is_what_send_task_publishes(rabbit: Rabbit, queue: str) -> None:
    """Field for field, the message the intake publishes is what the installed Celery's
    ``send_task`` publishes to RabbitMQ (body, headers, properties); only the per-process
    origin and reply address differ."""
    settings = make_settings("redis://127.0.0.1:1/0", broker_url=rabbit.url, queue=queue)
    app = make_producer(settings)
    app.send_task("postroom.send_email", kwargs={"job": JOB}, task_id=JOB["task_id"],
                  queue=queue, argsrepr="()", kwargsrepr=repr({"task_id": JOB["task_id"],
                  "solution_id": "acme"}))  # fmt: skip
    publisher = AmqpPublisher(app, queue, 5.0)
    publisher.publish(JOB)
    publisher.close()
    celerys, ours = _take(rabbit.url, queue)
    assert _comparable(celerys) == _comparable(ours)
    assert [[], {"job": JOB}] == json.loads(ours.body)[:2]


def test_a_lost_connection_is_made_again_and_each_job_published_once(
    rabbit: Rabbit, queue: str
) -> None:
    """The publisher keeps one connection; when it was closed underneath (a broker
    restart, an idle connection dropped), the next publish opens a new one, and every job
    is on the queue exactly once."""
    settings = make_settings("redis://127.0.0.1:1/0", broker_url=rabbit.url, queue=queue)
    enqueuer = Enqueuer(make_producer(settings), queue)
    publisher = enqueuer._amqp
    assert publisher is not None
    enqueuer.enqueue({**JOB, "task_id": "t1"})
    first = publisher._connection
    first.collect()  # the socket goes away under the kept connection
    enqueuer.enqueue({**JOB, "task_id": "t2"})
    assert publisher._connection is not first
    enqueuer.enqueue({**JOB, "task_id": "t3"})
    publisher.close()
    ids = [json.loads(m.body)[1]["job"]["task_id"] for m in _take(rabbit.url, queue)]
    assert ["t1", "t2", "t3"] == ids
