"""Every Redis key of postroom, in one place.

Keys that belong to one solution carry the hash tag ``{sid}`` so that the Lua scripts,
which touch several of them at once, also run on Redis Cluster.
"""

from __future__ import annotations

NS = "postroom"


def solution(sid: str) -> str:
    """JSON: ``{solution_id, created_at, token_hash, config}`` (password encrypted)."""
    return f"{NS}:{{{sid}}}:solution"


def token(token_hash: str) -> str:
    """String: the solution id a token (by its SHA-256) belongs to."""
    return f"{NS}:token:{token_hash}"


def solutions_index() -> str:
    """Set of every solution id."""
    return f"{NS}:solutions"


def task(sid: str, task_id: str) -> str:
    """JSON: the task document (lives in the result backend's Redis)."""
    return f"{NS}:{{{sid}}}:task:{task_id}"


def task_done_channel(sid: str, task_id: str) -> str:
    """Pub/sub channel announced when a task document reaches a final state."""
    return f"{NS}:{{{sid}}}:done:{task_id}"


def ledger(sid: str, task_id: str) -> str:
    """Hash: the send ledger of one message (token taken, recipients done, state)."""
    return f"{NS}:{{{sid}}}:ledger:{task_id}"


def deaths(sid: str, task_id: str) -> str:
    """Counter: how many times a worker's pool process died while this message was its
    only work (expires)."""
    return f"{NS}:{{{sid}}}:deaths:{task_id}"


def lease(sid: str, task_id: str) -> str:
    """String: which worker is sending this message now (expires)."""
    return f"{NS}:{{{sid}}}:lease:{task_id}"


def bucket(sid: str) -> str:
    """Hash ``{tokens, ts, cap, since}``: the solution's hLimit token bucket."""
    return f"{NS}:{{{sid}}}:bucket"


def request_bucket(sid: str, capacity: int) -> str:
    """Hash ``{tokens, ts, cap, since}``: the bucket a request's own, tighter ``hLimit``
    names."""
    return f"{NS}:{{{sid}}}:bucket:req:{capacity}"


def idempotency(sid: str, key_hash: str) -> str:
    """JSON: ``{body_hash, task_id, response}`` of an ``Idempotency-Key`` (24 h)."""
    return f"{NS}:{{{sid}}}:idem:{key_hash}"


def suppressions(sid: str) -> str:
    """Hash: normalized email -> JSON ``{email, reason, created_at, expires_at}``."""
    return f"{NS}:{{{sid}}}:suppressions"


def bounces(sid: str, email: str) -> str:
    """Sorted set of permanent RCPT rejection times of one address (7 days)."""
    return f"{NS}:{{{sid}}}:bounces:{email}"


def schedule() -> str:
    """Sorted set: task payloads due later (retries, deferred sends), scored by due time."""
    return f"{NS}:schedule"


def accepted() -> str:
    """Sorted set: every job accepted and not yet final (member: the job JSON), scored by
    when to check that something still holds it."""
    return f"{NS}:accepted"


def stats() -> str:
    """Hash: service-wide counters of outcomes (sent, failed, retried, deferred)."""
    return f"{NS}:stats"


# -- richer messages ------------------------------------------------------------------


def attachments(sid: str, task_id: str) -> str:
    """Hash: attachment index -> its bytes, for one message (the document's time to live;
    deleted when the task is final)."""
    return f"{NS}:{{{sid}}}:attachments:{task_id}"


def templates(sid: str) -> str:
    """Hash: template name -> JSON ``{name, subject, text, html, created_at, updated_at}``."""
    return f"{NS}:{{{sid}}}:templates"
# -- delivery events (webhooks) and the task list -------------------------------------


def webhooks(sid: str) -> str:
    """Hash: webhook id -> JSON endpoint record (url, events, secrets sealed, state)."""
    return f"{NS}:{{{sid}}}:webhooks"


def webhook_prefix(sid: str) -> str:
    """The prefix of one endpoint's keys: ``<prefix><id>:due`` (sorted set: event id ->
    when to try it next), ``<prefix><id>:pending`` (hash: event id -> JSON of the event
    and its attempts), ``<prefix><id>:log`` (list: the delivery log, newest first). The Lua
    scripts build these names from the prefix (same hash tag, same slot)."""
    return f"{NS}:{{{sid}}}:webhook:"


def webhook_due(sid: str, wid: str) -> str:
    return f"{webhook_prefix(sid)}{wid}:due"


def webhook_pending(sid: str, wid: str) -> str:
    return f"{webhook_prefix(sid)}{wid}:pending"


def webhook_log(sid: str, wid: str) -> str:
    return f"{webhook_prefix(sid)}{wid}:log"


def webhook_endpoints() -> str:
    """Set of every endpoint, as ``sid/id``: where the workers look for events to deliver."""
    return f"{NS}:webhook_endpoints"


def task_index(sid: str) -> str:
    """Sorted set: the solution's tasks, member ``<task_id> <recipient keys, comma-joined>``,
    scored by creation time; entries older than the documents' time to live are trimmed."""
    return f"{NS}:{{{sid}}}:tasks"
# -- worker instances: heartbeats and the messages each holds unacknowledged ---------------


def instances() -> str:
    """Sorted set: every ``postroom worker`` instance that has beaten (member: its id),
    scored by its last heartbeat (its own clock)."""
    return f"{NS}:instances"


def instance_alive(instance: str) -> str:
    """String with a time to live: present while the instance beats."""
    return f"{NS}:instance:{instance}:alive"


def instance_unacked(instance: str) -> str:
    """Set (in the broker's Redis): the delivery tags the instance holds unacknowledged."""
    return f"{NS}:instance:{instance}:unacked"


def instance_reaping(instance: str) -> str:
    """String: held by the instance that takes a dead one's messages back."""
    return f"{NS}:instance:{instance}:reaping"


# -- messages the worker could not read -----------------------------------------------------


def dead_letters() -> str:
    """List (in ``POSTROOM_REDIS_URL``): broker messages a worker could not read, newest
    first, each a JSON object ``{at, reason, error, headers, content_type, body}``; set aside
    by :mod:`postroom.shared.celery_wire.dead_letters`, never deleted by postroom."""
    return f"{NS}:dead-letters"
