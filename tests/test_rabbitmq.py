"""RabbitMQ as the broker (``POSTROOM_BROKER_URL=amqp://…``), on a real server."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable

import pytest
import redis

from tests.e2e import Stack
from tests.topologies import Rabbit, rabbitmqctl

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


def test_the_queue_is_a_quorum_queue(
    rabbit: Rabbit, real_redis: redis.Redis, loopback_stack: Callable[..., Stack]
) -> None:
    """The queue the API publishes to and the worker consumes is a quorum queue (replicated
    and durable on a RabbitMQ cluster)."""
    if rabbit.vhost is None:
        pytest.skip("needs rabbitmqctl")
    queue = rabbit.new_queue()
    stack = loopback_stack(broker_url=rabbit.url, queue=queue)
    stack.solution("acme", hLimit=100)
    assert 202 == stack.send({"to": ["a@example.com"], "text": "x"}).status_code
    listed = subprocess.run(["rabbitmqctl", "-q", "list_queues", "-p", rabbit.vhost, "name",
                             "type"], capture_output=True, text=True, check=True)
    assert [queue, "quorum"] in [line.split() for line in listed.stdout.splitlines()]


def test_a_publish_rabbitmq_does_not_confirm_is_a_503(
    rabbit: Rabbit, real_redis: redis.Redis, loopback_stack: Callable[..., Stack]
) -> None:
    """A queue that refuses new messages once full (a policy: ``max-length`` 1,
    ``reject-publish``; no worker drains it): the sends it takes are confirmed (202), the
    next one is nacked by RabbitMQ and answered 503 ``ServiceUnavailable``, and only the
    accepted sends have task documents (the refused one's was taken back)."""
    if rabbit.vhost is None or shutil.which("rabbitmqctl") is None:
        pytest.skip("needs rabbitmqctl")
    queue = rabbit.new_queue().replace("-q-", "-full-")
    rabbit.queues.append(queue)
    rabbitmqctl("set_policy", "-p", rabbit.vhost, "--apply-to", "queues", "full", ".*-full-.*",
                '{"max-length": 1, "overflow": "reject-publish"}')
    try:
        stack = loopback_stack(broker_url=rabbit.url, queue=queue)
        stack.solution("acme", hLimit=100)
        answers = []
        for i in range(5):
            answers.append(stack.send({"to": [f"u{i}@example.com"], "text": "x"}))
            if answers[-1].status_code != 202:
                break
    finally:
        rabbitmqctl("clear_policy", "-p", rabbit.vhost, "full")
    *accepted, refused = answers
    assert [202] * len(accepted) == [r.status_code for r in accepted]
    assert (503, "ServiceUnavailable") == (refused.status_code, refused.get_json()["type"])
    assert len(accepted) == len(list(real_redis.scan_iter("postroom:{acme}:task:*")))


def test_rabbitmq_down_at_intake_is_503(
    real_redis: redis.Redis, loopback_stack: Callable[..., Stack]
) -> None:
    """No RabbitMQ where the broker URL points: a send answers 503 and nothing is kept;
    the readiness check says 503 too."""
    from postroom.dev.embedded_redis import free_port

    stack = loopback_stack(broker_url=f"amqp://guest:guest@127.0.0.1:{free_port()}//",
                           broker_confirm_timeout_s=1.0)  # fmt: skip
    stack.solution("acme", hLimit=100)
    r = stack.send({"to": ["a@example.com"], "text": "x"})
    assert (503, "ServiceUnavailable") == (r.status_code, r.get_json()["type"])
    assert [] == list(real_redis.scan_iter("postroom:{acme}:task:*"))
    assert 503 == stack.client.get("/api/v1/solution/ready").status_code


def test_switching_from_the_redis_broker_to_rabbitmq_loses_nothing_queued(
    rabbit: Rabbit, real_redis: redis.Redis, redis_url: str,
    loopback_stack: Callable[..., Stack], monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A deployment on one Redis has 12 messages queued (one of them half moved by an
    interrupted earlier run, one reserved unacknowledged by a worker that stopped); it is
    restarted with ``POSTROOM_BROKER_URL`` on RabbitMQ and ``postroom queue move --from
    <the old Redis>`` is run: a worker on RabbitMQ sends all 12, each exactly once."""
    from postroom.cli import main
    from tests.helpers import env_of

    queue = rabbit.new_queue()
    old = loopback_stack(queue=queue)
    old.solution("acme", hLimit=100)
    ids = old.send_many(12)
    assert 12 == real_redis.llen(queue)
    real_redis.lmove(queue, f"{queue}.moving", "RIGHT", "LEFT")  # an interrupted move
    raw = real_redis.rpop(queue)  # as kombu's Redis transport holds a reserved message
    assert isinstance(raw, bytes)
    real_redis.hset("unacked", "tag-1", f'[{raw.decode()}, "", "{queue}"]')
    real_redis.zadd("unacked_index", {"tag-1": 1.0})

    new = loopback_stack(queue=queue, broker_url=rabbit.url)
    new.tokens = old.tokens
    for name, value in env_of(new.settings).items():
        monkeypatch.setenv(name, value)
    assert 0 == main(["queue", "move", "--from", redis_url])
    assert "moved 11 queued and 1 unacknowledged" in capsys.readouterr().out
    assert (0, 0, 0) == (real_redis.llen(queue), real_redis.llen(f"{queue}.moving"),
                         real_redis.hlen("unacked"))  # fmt: skip
    new.start_worker()

    docs = new.wait_all_final(ids, timeout=30)
    assert ["sent"] * 12 == [d["state"] for d in docs]
    assert sorted(d["result"]["messageId"] for d in docs) == sorted(
        str(m.message_id) for m in new.smtp.messages)
