"""RabbitMQ as the broker (``POSTROOM_BROKER_URL=amqp://…``), on a real server."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import redis

from tests.e2e import Stack
from tests.topologies import Cluster, Rabbit

pytestmark = [pytest.mark.slow]


def test_a_message_goes_through_rabbitmq(
    rabbit: Rabbit, real_redis: redis.Redis, loopback_stack: Callable[..., Stack]
) -> None:
    """A send published to RabbitMQ (a quorum queue) is sent by a worker consuming it."""
    stack = loopback_stack(broker_url=rabbit.url, queue=rabbit.new_queue())
    stack.solution("acme", hLimit=100)
    stack.start_worker()
    r = stack.send({"to": ["a@example.com"], "text": "x"})
    assert 202 == r.status_code, r.get_json()
    doc = stack.wait_final(r.get_json()["task_id"])
    assert "sent" == doc["state"]


def test_smoke_cluster(rabbit: Rabbit, redis_cluster: Cluster,
                       loopback_stack: Callable[..., Stack]) -> None:
    redis_cluster.flush()
    stack = loopback_stack(redis_url=redis_cluster.url, broker_url=rabbit.url,
                           queue=rabbit.new_queue())
    stack.solution("acme", hLimit=100)
    stack.start_worker()
    r = stack.send({"to": ["a@example.com"], "text": "x"})
    assert 202 == r.status_code, r.get_json()
    doc = stack.wait_final(r.get_json()["task_id"], timeout=20)
    assert "sent" == doc["state"]
