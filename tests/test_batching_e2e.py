"""Batches on real parts: postroom's kombu transport against a real Redis, and a real worker
process that takes queued messages in batches from a real broker and sends them to a real
SMTP server."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import redis
from kombu import Connection, Consumer, Exchange, Queue

from postroom.shared.celery_wire.redis_transport import Channel, Transport, transport_for
from tests.e2e import Stack
from tests.helpers import RoundTrips, all_bytes
from tests.stack import wait_for


def test_a_redis_broker_gets_postroom_transport_and_others_keep_kombus() -> None:
    assert "postroom.shared.celery_wire.redis_transport:Transport" == transport_for("redis://127.0.0.1:6379/0")
    with Connection("redis://127.0.0.1:6379/0", transport=transport_for("redis://")) as conn:
        assert isinstance(conn.transport, Transport)
    assert transport_for("rediss://redis.example.com:6380/0") is None
    assert transport_for("amqp://guest@127.0.0.1//") is None


def test_ack_many_acknowledges_a_batch_in_redis_and_in_kombus_books(
    real_redis: redis.Redis, redis_url: str
) -> None:
    with Connection(redis_url, transport=Transport) as conn:
        queue = conn.SimpleQueue("batch-test")
        for n in range(5):
            queue.put({"n": n})
        got = [queue.get(timeout=5) for _ in range(5)]
        channel = got[0].channel
        assert isinstance(channel, Channel)
        assert 5 == real_redis.hlen("unacked") == real_redis.zcard("unacked_index")

        channel.ack_many(got[:3])
        assert 2 == real_redis.hlen("unacked") == real_redis.zcard("unacked_index")
        assert [True, True, True, False, False] == [m.acknowledged for m in got]
        qos = channel.qos  # kombu's prefetch accounting follows: 2 still held
        assert 2 == len(qos._delivered) - len(qos._dirty)
        for message in got[3:]:
            message.ack()
        assert 0 == real_redis.hlen("unacked") == real_redis.zcard("unacked_index")
        queue.close()


@contextmanager
def consuming(redis_url: str, queue: str, prefetch: int) -> Iterator[Consuming]:
    """A kombu consumer of ``queue`` on postroom's transport; ``round()`` is one delivery
    round (a BRPOP and what the channel takes after it) and returns what it delivered."""
    with Connection(redis_url, transport=Transport) as conn:
        got: list[Any] = []
        q = Queue(queue, Exchange(queue), routing_key=queue)
        with Consumer(conn, [q], callbacks=[lambda body, message: got.append(message)],
                      accept=["json"]) as consumer:
            consumer.qos(prefetch_count=prefetch)
            assert isinstance(consumer.channel, Channel)
            yield Consuming(conn, consumer.channel, got)


@dataclass
class Consuming:
    conn: Connection
    channel: Channel
    got: list[Any]

    def round(self) -> list[Any]:
        self.got.clear()
        self.conn.drain_events(timeout=5)
        return list(self.got)


def publish(redis_url: str, queue: str, n: int) -> None:
    with Connection(redis_url, transport=Transport) as conn:
        producer = conn.Producer(serializer="json")
        for i in range(n):
            producer.publish({"n": i}, exchange=Exchange(queue), routing_key=queue,
                             declare=[Queue(queue, Exchange(queue), routing_key=queue)])


def test_after_a_brpop_the_channel_takes_what_the_prefetch_allows_recorded_unacked(
    real_redis: redis.Redis, redis_url: str
) -> None:
    publish(redis_url, "take-test", 6)
    with consuming(redis_url, "take-test", prefetch=4) as consumer:
        got = consumer.round()  # kombu's delivery of the first, the channel's take of 3
        assert [0, 1, 2, 3] == [m.payload["n"] for m in got]
        assert (4, 2) == (real_redis.hlen("unacked"), real_redis.llen("take-test"))
        assert 4 == len(consumer.channel.qos._delivered)
    # closed with them unacknowledged: kombu put them back, as it does its own
    assert (0, 6) == (real_redis.hlen("unacked"), real_redis.llen("take-test"))


def test_the_job_a_brpop_brings_is_recorded_by_the_take_after_it(
    real_redis: redis.Redis, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One job waiting, room for more: the BRPOP, then one script that records it
    unacknowledged and finds nothing more to take — two round trips, not three. With no
    room left (prefetch 1) the job is recorded all the same, and nothing more is taken."""
    publish(redis_url, "take-test", 1)
    with consuming(redis_url, "take-test", prefetch=4) as consumer:
        trips = RoundTrips(monkeypatch)
        got = consumer.round()
        assert ([0], 2) == ([m.payload["n"] for m in got], trips.count)
        [tag] = [t.decode() for t in all_bytes(real_redis.hkeys("unacked"))]
        assert tag == got[0].delivery_tag
        assert json.loads(real_redis.hget("unacked", tag) or b"[]")[0] == got[0]._raw
        got[0].ack()
        assert (0, 0) == (real_redis.hlen("unacked"), real_redis.zcard("unacked_index"))

    publish(redis_url, "take-test", 3)
    with consuming(redis_url, "take-test", prefetch=1) as consumer:
        got = consumer.round()
        assert [0] == [m.payload["n"] for m in got]
        assert (1, 2) == (real_redis.hlen("unacked"), real_redis.llen("take-test"))
        got[0].ack()


def test_what_the_take_records_is_what_kombu_restores(
    real_redis: redis.Redis, redis_url: str
) -> None:
    """Recorded by the script, restored by kombu's own sweep: the same message back."""
    publish(redis_url, "take-test", 3)
    with consuming(redis_url, "take-test", prefetch=10) as consumer:
        got = consumer.round()
        assert (3, 3, 0) == (len(got), real_redis.hlen("unacked"), real_redis.llen("take-test"))
        qos = consumer.channel.qos
        for message in got:  # what the restore sweep does for each overdue one
            qos.restore_by_tag(message.delivery_tag)
        assert (0, 3) == (real_redis.hlen("unacked"), real_redis.llen("take-test"))
        restored = sorted(json.loads(raw)["body"] for raw in real_redis.lrange("take-test", 0, -1))
        assert restored == sorted(m._raw["body"] for m in got)
        qos._delivered.clear()  # the restored ones are no longer this consumer's
        qos._dirty.clear()
        again = consumer.round()
        assert [0, 1, 2] == sorted(m.payload["n"] for m in again)
        for message in again:
            message.ack()
    assert (0, 0) == (real_redis.hlen("unacked"), real_redis.llen("take-test"))


def test_a_foreign_message_behind_the_first_is_put_back_not_lost(
    real_redis: redis.Redis, redis_url: str
) -> None:
    publish(redis_url, "take-test", 1)
    real_redis.lpush("take-test", b"not a kombu message")
    publish(redis_url, "take-test", 1)
    with consuming(redis_url, "take-test", prefetch=10) as consumer:
        got = consumer.round()
        assert [0] == [m.payload["n"] for m in got]
        assert [b"not a kombu message"] == real_redis.lrange("take-test", -1, -1)
        assert 2 == real_redis.llen("take-test")
        for message in got:
            message.ack()


def test_the_channel_keeps_one_client_for_its_commands(redis_url: str) -> None:
    with Connection(redis_url, transport=Transport) as conn:
        channel = conn.default_channel
        first = channel._create_client()
        assert first is channel._create_client()
        assert first is not channel._create_client(asynchronous=True)


def test_a_worker_takes_queued_messages_in_batches_and_sends_each_once(
    loopback_stack: Callable[..., Stack], real_redis: redis.Redis, redis_url: str
) -> None:
    """30 messages wait when a one-process worker starts (batch size 8, a relay taking
    0.25 s per message, a redelivery window that leaves 1 s to start a message): the worker
    hands them out in batches, puts back onto the queue those a batch could not start within
    their window, and in the end every one is ``sent``, each Message-ID received once."""
    stack = loopback_stack(smtp_timeout_s=1.5, max_recipients=1, visibility_timeout_s=21,
                           worker_batch=8, log_level="DEBUG",
                           sends_in_flight=1, relay_concurrency=1)  # one lane: in turn
    stack.solution("acme", hLimit=1000)
    stack.smtp.script.rcpt_delay_s = 0.25
    ids = [stack.send({"to": [f"r{n}@example.com"], "text": "x"}).get_json()["task_id"]
           for n in range(30)]
    worker = stack.start_worker(concurrency=1)

    docs = stack.wait_all_final(ids, timeout=90)
    assert ["sent"] * 30 == [d["state"] for d in docs]
    received = Counter(m.message_id for m in stack.smtp.messages)
    assert {d["result"]["messageId"]: 1 for d in docs} == received
    wait_for(lambda: real_redis.hlen("unacked") == 0, 10, message="every message acknowledged")

    assert worker.log_path is not None
    log = worker.log_path.read_text()
    sizes = [int(line.split("a batch of ")[1].split()[0])
             for line in log.splitlines() if "a batch of " in line and "handed" in line]
    assert max(sizes) > 1, sizes
    assert sum(sizes) >= 30
    assert "go back onto the queue" in log
    assert "r1@example.com" not in log  # a batch is logged by task id, not by its content


@pytest.mark.parametrize("batch", [1])
def test_batch_size_one_sends_one_message_per_hand_out(
    loopback_stack: Callable[..., Stack], real_redis: redis.Redis, batch: int
) -> None:
    stack = loopback_stack(worker_batch=batch, log_level="DEBUG")
    stack.solution("acme", hLimit=1000)
    ids = [stack.send({"to": [f"r{n}@example.com"], "text": "x"}).get_json()["task_id"]
           for n in range(6)]
    worker = stack.start_worker(concurrency=1)
    docs = stack.wait_all_final(ids, timeout=60)
    assert ["sent"] * 6 == [d["state"] for d in docs]
    assert worker.log_path is not None
    log = worker.log_path.read_text()
    assert "a batch of 1 handed" in log
    assert "a batch of 2" not in log
