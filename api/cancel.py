"""Canceling a task: the one place where a task's state becomes ``canceled``.

A task may be canceled while it is ``scheduled`` (its ``send_at`` has not come) or
``queued`` and not yet begun by a worker; ``canceled`` is final. One script
(``shared/lua/task_cancel.lua``) checks that no worker holds the message's lease and that
its ledger shows no attempt, and then leaves a lease of its own (so a worker that reaches
the message now finds it held, and then its document final), deletes the attachments,
writes the document and queues the ``email.canceled`` event for the solution's webhooks.
A task already sending, sent, failed, retrying or deferred is a 409 ``Conflict``; a cancel
racing the send ends as exactly one of them.

The job itself stays where it is (the schedule, the queue) until a worker meets it: the
worker finds the document final and drops it, as for any job whose task has ended.
"""

from __future__ import annotations

import json
import time
from typing import cast

import redis

from postroom.shared import events, keys
from postroom.shared.documents import DocumentStore
from postroom.shared.errors import Conflict, NotFound
from postroom.shared.records import TaskDocument
from postroom.shared.scripts import script
from postroom.shared.solutions import iso

#: the states a task may be canceled in
CANCELABLE = frozenset({"scheduled", "queued"})
#: the lease a cancel leaves: a worker that reaches the message meanwhile looks again later
HOLDER = "canceled"
LEASE_MS = 60_000
_TRIES = 5


def cancel_task(
    state: redis.Redis, results: redis.Redis, documents: DocumentStore, sid: str, task_id: str
) -> TaskDocument:
    """Cancel task ``task_id`` of solution ``sid``; the document in state ``canceled``.
    NotFound when there is no such task, Conflict when it is begun or final."""
    same = results is state
    for _ in range(_TRIES):
        raw = results.get(keys.task(sid, task_id))
        if raw is None:
            raise NotFound(f"task {task_id!r} not found (unknown, or expired)")
        doc = cast(TaskDocument, json.loads(raw))
        if doc["state"] not in CANCELABLE:
            raise _conflict(doc["state"])
        canceled: TaskDocument = {**doc, "state": "canceled", "next_attempt_at": None,
                                  "error": None, "updated_at": iso(time.time())}  # fmt: skip
        script_keys = [keys.lease(sid, task_id), keys.ledger(sid, task_id),
                       keys.attachments(sid, task_id), keys.webhooks(sid)]  # fmt: skip
        args: list[str | int] = [HOLDER, LEASE_MS, "", "", ""]
        encoded = json.dumps(canceled)
        if same:
            script_keys.append(keys.task(sid, task_id))
            args[2:5] = [raw.decode() if isinstance(raw, bytes) else raw, encoded,
                         keys.task_done_channel(sid, task_id)]  # fmt: skip
        args += events.emit_args(sid, [(events.EMAIL_CANCELED, canceled)])[1]
        answer = script("task_cancel", functions=("event_emit",))(state, script_keys, args)
        answer = answer.decode() if isinstance(answer, bytes) else answer
        if answer == "changed":
            continue
        if answer == "begun":
            raise _conflict("sending")
        if not same:  # the result backend's Redis: after the lease has fenced the workers
            ttl = results.ttl(keys.task(sid, task_id))
            documents.put(canceled, ttl_s=ttl if isinstance(ttl, int) and ttl > 0 else None)
        return canceled
    raise _conflict("changing")


def _conflict(state: str) -> Conflict:
    return Conflict(
        f"the task is {state}: only a scheduled task, or a queued one no worker has begun, "
        "can be canceled",
        state=state,
    )
