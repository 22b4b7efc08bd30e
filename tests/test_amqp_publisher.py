"""The intake's own publishing to RabbitMQ (``shared/celery_wire/amqp_publisher.py``) on a
real server: the message is what Celery's ``send_task`` publishes, confirmed, over a kept
connection."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any, cast

import pytest
import redis
from kombu import Connection

from postroom.shared import keys
from postroom.shared.celery_wire.amqp_publisher import AmqpPublisher
from postroom.shared.celery_wire.task_message import decode_body
from postroom.shared.queue import Enqueuer, make_producer
from postroom.shared.records import Job
from tests.e2e import Stack
from tests.helpers import RoundTrips, auth, make_settings
from tests.topologies import Rabbit, rabbitmqctl

JOB = cast(Job, {"task_id": "7d0c7a52-1", "solution_id": "acme",
                 "message": {"to": ["a@example.com"]}})


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
    # and the worker's decoding reads both
    assert [JOB, JOB] == [decode_body(m.body) for m in (celerys, ours)]


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


@pytest.mark.slow
def test_on_rabbitmq_a_known_solutions_send_takes_one_redis_round_trip(
    rabbit: Rabbit, real_redis: redis.Redis, loopback_stack: Callable[..., Stack],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Once the API has seen a solution pass, a send to RabbitMQ is judged and written in
    one Redis round trip (the one-step script, without the queue push) and then published;
    the worker sends it as any other."""
    stack = loopback_stack(broker_url=rabbit.url, queue=rabbit.new_queue())
    stack.solution("acme", hLimit=100)
    first = stack.send({"to": ["a@example.com"], "text": "x"})
    warm = stack.send({"to": ["c@example.com"], "text": "x"})  # the script loaded
    trips = RoundTrips(monkeypatch)
    second = stack.send({"to": ["b@example.com"], "text": "x"})
    assert (202, 202, 202, 1) == (first.status_code, warm.status_code, second.status_code,
                                  trips.count)  # fmt: skip
    stack.start_worker()
    docs = [stack.wait_final(r.get_json()["task_id"]) for r in (first, warm, second)]
    assert ["sent"] * 3 == [d["state"] for d in docs]
    assert 0 == real_redis.zcard(keys.accepted())


@pytest.mark.slow
def test_a_batch_rabbitmq_stops_confirming_keeps_what_it_confirmed(
    rabbit: Rabbit, real_redis: redis.Redis, loopback_stack: Callable[..., Stack]
) -> None:
    """A queue that fills up (``max-length``, ``reject-publish``; a quorum queue may take a
    message or two past the limit) and a batch of five on the one-step path: those
    RabbitMQ confirms are answered 202, the first it nacks and every one after it are
    taken back and answered on their own (503 each), and only the confirmed ones keep a
    task document and an accepted-set entry."""
    if rabbit.vhost is None:
        pytest.skip("needs rabbitmqctl")
    queue = rabbit.new_queue().replace("-q-", "-full-")
    rabbit.queues.append(queue)
    stack = loopback_stack(broker_url=rabbit.url, queue=queue)
    token = stack.solution("acme", hLimit=100)
    assert 202 == stack.send({"to": ["a@example.com"], "text": "x"}).status_code  # seen
    rabbitmqctl("set_policy", "-p", rabbit.vhost, "--apply-to", "queues", "full", ".*-full-.*",
                '{"max-length": 2, "overflow": "reject-publish"}')
    try:
        messages = [{"to": [f"u{i}@example.com"], "text": "x"} for i in range(5)]
        r = stack.client.post("/api/v1/solutions/acme/email/batch", json={"messages": messages},
                              headers=auth(token))
    finally:
        rabbitmqctl("clear_policy", "-p", rabbit.vhost, "full")
    assert 200 == r.status_code, r.get_json()
    statuses = [m["status"] for m in r.get_json()["results"]]
    confirmed = statuses.count(202)
    assert 1 <= confirmed < 5 and [202] * confirmed + [503] * (5 - confirmed) == statuses
    kept = 1 + confirmed  # with the first send
    assert kept == len(list(real_redis.scan_iter("postroom:{acme}:task:*")))
    assert kept == real_redis.zcard(keys.accepted())


def test_a_message_we_publish_is_one_celerys_own_worker_runs(rabbit: Rabbit, queue: str) -> None:
    """A job published by postroom's publisher is run by Celery's own worker (its consumer,
    its default strategy and request: not postroom's), configured as postroom configures
    Celery, as the task ``postroom.send_email`` with the job as its argument ``job``."""
    from celery import Celery
    from celery.contrib.testing.worker import start_worker

    from postroom.shared.celery_wire.task_message import SEND_TASK
    from postroom.shared.queue import celery_config
    from tests.stack import wait_for

    settings = make_settings("redis://127.0.0.1:1/0", broker_url=rabbit.url, queue=queue)
    app = Celery("roundtrip", set_as_current=False)
    app.conf.update(celery_config(settings), worker_hijack_root_logger=False)
    ran: list[dict[str, Any]] = []

    @app.task(name=SEND_TASK, shared=False)
    def send_email(job: dict[str, Any]) -> None:
        ran.append(job)

    publisher = AmqpPublisher(make_producer(settings), queue, 5.0)
    publisher.publish(JOB)
    publisher.close()
    with start_worker(app, pool="solo", perform_ping_check=False, loglevel="WARNING",
                      shutdown_timeout=10.0):
        wait_for(lambda: bool(ran), 20, message="Celery's worker to run the published job")
    assert [JOB] == ran
