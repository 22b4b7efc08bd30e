"""The cancel script (api/cancel.py, shared/lua/task_cancel.lua) on a real
Redis and
on fakeredis beside it: a task no worker has begun becomes ``canceled``; one a worker
holds, or whose ledger shows an attempt, is a 409; the result backend apart works too."""

from __future__ import annotations

import json

import pytest
import redis

from postroom.api.cancel import HOLDER, cancel_task
from postroom.shared import keys
from postroom.shared.documents import DocumentStore, new_document
from postroom.shared.errors import Conflict, NotFound

SID, TASK = "acme", "t-1"


def _doc(client: redis.Redis, state: str = "scheduled") -> DocumentStore:
    store = DocumentStore(client, 3600)
    store.put({**new_document(TASK, SID, 0.0), "state": state})
    client.hset(keys.attachments(SID, TASK), "0", b"bytes")
    return store


def test_a_scheduled_task_is_canceled(any_redis: redis.Redis) -> None:
    """The document ends ``canceled`` (its time to live kept), the lease is the cancel's,
    the attachments are gone, and ``?wait`` callers are told."""
    store = _doc(any_redis)
    pubsub = any_redis.pubsub()
    pubsub.subscribe(keys.task_done_channel(SID, TASK))
    # the subscription is in place before the cancel publishes
    confirmed = pubsub.get_message(timeout=5)
    assert confirmed is not None and "subscribe" == confirmed["type"]
    doc = cancel_task(any_redis, any_redis, store, SID, TASK)
    assert ("canceled", None) == (doc["state"], doc["next_attempt_at"])
    stored = store.get(SID, TASK)
    assert stored is not None and "canceled" == stored["state"]
    assert 0 < any_redis.ttl(keys.task(SID, TASK)) <= 3600
    assert HOLDER.encode() == any_redis.get(keys.lease(SID, TASK))
    assert not any_redis.exists(keys.attachments(SID, TASK))
    messages = [pubsub.get_message(timeout=0.2) for _ in range(5)]
    assert [b"canceled"] == [m["data"] for m in messages if m is not None]
    pubsub.close()


@pytest.mark.parametrize("state", ["retrying", "deferred", "sent", "failed", "canceled"])
def test_a_task_past_waiting_is_409(any_redis: redis.Redis, state: str) -> None:
    """Only ``scheduled`` and ``queued`` tasks may be canceled; nothing changes otherwise."""
    store = _doc(any_redis, state)
    with pytest.raises(Conflict) as caught:
        cancel_task(any_redis, any_redis, store, SID, TASK)
    assert state == caught.value.extra["state"]
    assert any_redis.exists(keys.attachments(SID, TASK))


@pytest.mark.parametrize("held_by", ["lease", "ledger"])
def test_a_task_a_worker_has_begun_is_409(any_redis: redis.Redis, held_by: str) -> None:
    """A queued task whose lease a worker holds, or whose ledger shows an attempt, is
    being sent: 409, and the document stays ``queued``."""
    store = _doc(any_redis, "queued")
    if held_by == "lease":
        any_redis.set(keys.lease(SID, TASK), "host:1", px=10_000)
    else:
        any_redis.hset(keys.ledger(SID, TASK), "sending", "1")
    with pytest.raises(Conflict):
        cancel_task(any_redis, any_redis, store, SID, TASK)
    stored = store.get(SID, TASK)
    assert stored is not None and "queued" == stored["state"]


def test_an_unknown_task_is_404(any_redis: redis.Redis) -> None:
    with pytest.raises(NotFound):
        cancel_task(any_redis, any_redis, DocumentStore(any_redis, 60), SID, "nope")


def test_with_a_result_backend_apart(real_redis: redis.Redis, redis_url: str) -> None:
    """With the documents in another Redis client (another backend), the script fences the
    workers first and the document is written after, with its time to live kept."""
    results = redis.Redis.from_url(redis_url)
    try:
        store = _doc(results)
        doc = cancel_task(real_redis, results, store, SID, TASK)
        assert "canceled" == doc["state"]
        raw = results.get(keys.task(SID, TASK))
        assert isinstance(raw, bytes) and "canceled" == json.loads(raw)["state"]
        assert 0 < results.ttl(keys.task(SID, TASK)) <= 3600
        assert HOLDER.encode() == real_redis.get(keys.lease(SID, TASK))
    finally:
        results.close()
