"""Task documents: the state of one accepted message, as callers read it.

They live in the result backend's Redis (``POSTROOM_RESULT_BACKEND``) for
``POSTROOM_RESULT_TTL`` seconds. The intake API writes the first one (``queued``) before
it enqueues; afterwards only the worker that holds the message's lease writes it.
"""

from __future__ import annotations

import json
import time
from typing import Any, cast

import redis

from postroom.shared import keys
from postroom.shared.records import TaskDocument
from postroom.shared.redis_client import is_cluster
from postroom.shared.solutions import iso

STATES = ("scheduled", "queued", "deferred", "retrying", "sent", "failed", "canceled")
FINAL = frozenset({"sent", "failed", "canceled"})


def new_document(
    task_id: str, sid: str, now: float, metadata: dict[str, str] | None = None
) -> TaskDocument:
    stamp = iso(now)
    return {
        "task_id": task_id,
        "solution_id": sid,
        "state": "queued",
        "attempts": 0,
        "created_at": stamp,
        "updated_at": stamp,
        "next_attempt_at": None,
        "result": None,
        "error": None,
        "pending": [],
        "metadata": metadata or {},
    }


class DocumentStore:
    def __init__(self, client: redis.Redis, ttl_s: int) -> None:
        self._r = client
        self.ttl_s = ttl_s

    def get(self, sid: str, task_id: str) -> TaskDocument | None:
        raw = self._r.get(keys.task(sid, task_id))
        return cast(TaskDocument, json.loads(raw)) if raw is not None else None

    def encode(self, doc: TaskDocument) -> str:
        """The document as it is stored, stamped with the time of this write."""
        doc["updated_at"] = iso(time.time())
        return json.dumps(doc)

    def put(self, doc: TaskDocument, pipe: Any = None, ttl_s: int | None = None) -> None:
        """Write a document (for ``ttl_s``, else the store's time to live); when it is
        final, wake whoever waits for it (``?wait=N``).

        (The worker writes it with the ledger and the lease in one step when the result
        backend is the state's Redis: ``shared/lua/attempt_finish.lua``.)"""
        sid, tid = doc["solution_id"], doc["task_id"]
        target = pipe if pipe is not None else self._r.pipeline(transaction=False)
        target.set(keys.task(sid, tid), self.encode(doc), ex=ttl_s or self.ttl_s)
        final = doc["state"] in FINAL
        # a Redis Cluster pipeline refuses PUBLISH: it goes on its own, after the write
        # (with a caller's pipeline, maybe before it: a waiter re-reads within a second)
        clustered = is_cluster(target)
        if final and not clustered:
            target.publish(keys.task_done_channel(sid, tid), doc["state"])
        if pipe is None:
            target.execute()
        if final and clustered:
            self._r.publish(keys.task_done_channel(sid, tid), doc["state"])

    def delete(self, sid: str, task_id: str) -> None:
        self._r.delete(keys.task(sid, task_id))

    def wait_final(self, sid: str, task_id: str, timeout_s: float) -> TaskDocument | None:
        """The document once final, or ``None`` if it is not final within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        pubsub = self._r.pubsub(ignore_subscribe_messages=True)
        try:
            pubsub.subscribe(keys.task_done_channel(sid, task_id))
            while True:
                doc = self.get(sid, task_id)
                if doc is not None and doc["state"] in FINAL:
                    return doc
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                # wake on the announcement, or re-read now and then in case it was missed
                pubsub.get_message(timeout=min(left, 1.0))
        finally:
            pubsub.close()
