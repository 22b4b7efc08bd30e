"""Worker instances beat in Redis; a survivor takes a dead instance's messages back at
once, and a lease whose instance stopped beating is taken over."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable

import pytest
import redis

from postroom.shared import keys
from postroom.worker import instances
from postroom.worker.instances import Heartbeat
from postroom.worker.lease import holder, holder_dead
from tests.e2e import Stack
from tests.helpers import queue_length
from tests.stack import wait_for


def test_a_survivor_takes_back_only_the_messages_of_instances_that_stopped_beating(
    any_redis: redis.Redis,
) -> None:
    """Two instances beat; one stops (its alive key expires). The other puts back the
    tags of the dead one, once (a second look finds nothing), and never its own or
    those of an instance still beating."""
    restored: list[list[str]] = []
    me = Heartbeat("me", [any_redis], restored.append, every_s=1, dead_after_s=0.2)
    other = Heartbeat("other", [any_redis], restored.append, every_s=1, dead_after_s=0.2)
    quiet = Heartbeat("quiet", [any_redis], restored.append, every_s=1, dead_after_s=0.2)
    for beat in (me, other, quiet):
        beat.beat()
    any_redis.sadd(keys.instance_unacked("me"), "m1")
    any_redis.sadd(keys.instance_unacked("other"), "o1")
    any_redis.sadd(keys.instance_unacked("quiet"), "q1", "q2")
    time.sleep(0.3)  # every alive key has expired; "me" and "other" beat again
    me.beat()
    other.beat()
    any_redis.zadd(keys.instances(), {"me": 0, "other": 0})  # quiet for long, by the clock

    assert 2 == me.take_back()
    assert [["q1", "q2"]] == restored
    assert 0 == me.take_back()
    assert {b"me", b"other"} == set(any_redis.zrange(keys.instances(), 0, -1))
    assert {b"o1"} == any_redis.smembers(keys.instance_unacked("other"))


def test_a_lease_of_an_instance_that_stopped_beating_may_be_taken_over(
    any_redis: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lease names its holder's instance; while the instance beats the holder is alive,
    once its key expires the holder counts as dead (on any host)."""
    monkeypatch.setattr(instances, "_instance", "far-1-abc")
    far = holder().replace(holder().partition(":")[0], "another-host", 1)
    assert far.endswith("/far-1-abc")
    Heartbeat("far-1-abc", [any_redis], None, every_s=1, dead_after_s=0.2).beat()
    assert not holder_dead(any_redis, far)
    time.sleep(0.3)
    assert holder_dead(any_redis, far)
    assert not holder_dead(any_redis, "another-host:1")  # no instance: only its lease's end


@pytest.mark.slow
@pytest.mark.fault
def test_a_killed_worker_instance_s_messages_are_sent_by_another_within_a_minute(
    loopback_stack: Callable[..., Stack], real_redis: redis.Redis, redis_url: str,
) -> None:
    """``kill -9`` of a worker instance holding 30 messages, 20 of them mid-transaction
    (the relay cap) and the rest reserved: a second instance, already running, sends every
    one well within 60 s — not after the broker's two-hour redelivery window — and the
    relay receives each Message-ID once."""
    stack = loopback_stack(instance_heartbeat_s=0.5, instance_dead_after_s=3.0, smtp_timeout_s=60)
    stack.solution("acme", hLimit=100000)
    gate = threading.Event()
    stack.smtp.script.rcpt_gate = gate
    ids = stack.send_many(30)
    first = stack.start_worker(concurrency=2)
    wait_for(lambda: stack.smtp.held >= 20 and queue_length(real_redis) == 0, 30,
             message="20 transactions held at RCPT TO, nothing left in the queue")
    assert 30 == real_redis.hlen("unacked")
    stack.start_worker(concurrency=2)
    time.sleep(1.0)  # the survivor beats
    first.kill()
    killed = time.monotonic()
    gate.set()

    docs = stack.wait_all_final(ids, timeout=60)
    took = time.monotonic() - killed
    assert ["sent"] * 30 == [d["state"] for d in docs]
    assert {d["result"]["messageId"]: 1 for d in docs} == Counter(
        m.message_id for m in stack.smtp.messages
    )
    assert took < 60
    assert b"stopped beating: 30 messages" in stack.logs()
