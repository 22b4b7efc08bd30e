"""``POST /solutions/{sid}/email/batch``: up to ``POSTROOM_MAX_BATCH`` sends in one request.

Each message is judged as ``POST /solutions/{sid}/email`` judges one — the schema, ``from``,
the relay, the suppression list, the hLimit bucket — and gets its own answer in ``results``,
in the order of ``messages``: queued (``status`` 202, its ``task_id``; poll it as any task)
or refused (the error body that route would give it, ``status`` included). The request as
a whole is refused only for what concerns all of it: the token (401), the solution (404),
the body (413, 415, 400 for no ``messages`` list or more than ``POSTROOM_MAX_BATCH``), and
the options the batch does not take (``?wait``, the ``Idempotency-Key`` header: 400 naming
them).

A message may carry its own ``idempotency_key`` (as a single send's ``Idempotency-Key``): the
same key and message within 24 h answer with the task the first one made, queued once, so a
batch retried after a lost answer queues nothing twice. A keyed message is judged and queued
on its own (the key is claimed before, confirmed after), like a keyed single send; a key
reused with another message is that message's 422 ``IdempotencyMismatch``.

The messages that pass queue together: one round trip reads the caller and the solution,
one more judges and queues every message by the one-step script (:mod:`postroom.api.express`) in a
single transaction. A message that script does not queue (a recipient suppressed, an empty
bucket, the record changed meanwhile) takes the usual path on its own and gets that path's
answer. Like single sends, the batch only peeks at the bucket: the worker takes each
message's token, so a batch larger than the tokens left is accepted and its surplus ends
``RateLimited`` (or waits, under ``defer``).
"""

from __future__ import annotations

import logging
from typing import Any

from flask import Blueprint, Response, jsonify, request
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from postroom.api import sends
from postroom.api.auth import Principal
from postroom.api.body import json_object
from postroom.api.intake import body_fingerprint
from postroom.api.routes import tasks
from postroom.api.services import Services, services
from postroom.api.templates.rendering import apply_template
from postroom.shared.documents import new_document
from postroom.shared.errors import PostroomError, ServiceUnavailable, ValidationError
from postroom.shared.ratelimit import Decision
from postroom.shared.schemas import load_or_raise
from postroom.shared.solutions import Solution

bp = Blueprint("batch", __name__)
log = logging.getLogger("postroom.api")

STORE_AWAY = "the service's store is unavailable; this message was not accepted, retry it"
#: a message's own idempotency key, taken out before the message is loaded as a send
KEY = "idempotency_key"


def _single_send_options() -> None:
    """``?wait`` and ``Idempotency-Key`` belong to the one-message route."""
    if request.args.get("wait") is not None:
        raise ValidationError(
            "wait is not taken by the batch route",
            fields={"wait": ["Not taken here: poll each task, or send alone with ?wait=N."]},
        )
    if request.headers.get("Idempotency-Key") is not None:
        raise ValidationError(
            "Idempotency-Key is not taken by the batch route",
            fields={"Idempotency-Key": [f"Not taken here: give each message its own {KEY}."]},
        )


def _queued(index: int, sid: str, task_id: str, state: str = "queued") -> dict[str, Any]:
    link = tasks.link(sid, task_id)
    return {"index": index, "status": 202, "task_id": task_id, "state": state,
            "links": {"self": link}}  # fmt: skip


def _refused(index: int, err: PostroomError) -> dict[str, Any]:
    return {"index": index, **err.body()}


@bp.post("/solutions/<sid>/email/batch")
def send_batch(sid: str) -> tuple[Response, int]:
    svc = services()
    try:
        _single_send_options()
        messages: list[Any] = load_or_raise(svc.schemas.batch, json_object())["messages"]
    except PostroomError:
        svc.authorize(sid)  # a bad token or an unknown solution is answered first
        raise
    known = svc.authorize(sid)
    solution = known[1]

    results: list[dict[str, Any]] = [{} for _ in messages]
    # index, data, and the job built for the one-step path (None: the usual path judges it,
    # as when `from` or the relay is refused, or when that path is not open)
    ready: list[tuple[int, dict[str, Any], dict[str, Any] | None]] = []
    keyed: list[tuple[int, dict[str, Any], str, str]] = []  # index, data, key, fingerprint
    for index, raw in enumerate(messages):
        try:
            key, fingerprint, raw = _key_of(raw)
            if key is not None:  # a replay is answered before the schema can refuse it
                earlier = svc.idempotency.get(sid, key)
                if earlier is not None:
                    task_id = sends.replayed(earlier, fingerprint, KEY)
                    results[index] = _queued(index, sid, task_id)
                    continue
            data = load_or_raise(svc.schemas.send, raw)
            apply_template(svc, sid, data)
        except PostroomError as err:
            results[index] = _refused(index, err)
            continue
        if key is not None:
            keyed.append((index, data, key, fingerprint))
            continue
        job = sends.prepared(svc, data, solution) if svc.express is not None else None
        ready.append((index, data, job))

    decisions = _in_one_step(svc, solution, ready)
    for (index, data, job), decision in zip(ready, decisions, strict=True):
        if decision is None or job is None:
            results[index] = _alone(svc, sid, index, data, known)
        else:
            results[index] = _queued(index, sid, job["task_id"])
    for index, data, key, fingerprint in keyed:
        results[index] = _alone(svc, sid, index, data, known, (key, fingerprint))
    queued = sum(1 for r in results if r["status"] == 202)
    log.info("batch queued", extra={"solution_id": sid, "queued": queued,
                                    "refused": len(results) - queued})  # fmt: skip
    body = {"queued": queued, "refused": len(results) - queued, "results": results}
    return jsonify(body), 200


def _in_one_step(
    svc: Services,
    solution: Solution,
    ready: list[tuple[int, dict[str, Any], dict[str, Any] | None]],
) -> list[Decision | None]:
    """Each built job judged and queued by the one-step script, all in one round trip;
    None for a message it did not queue (and for every one where that path is not open)."""
    express = svc.express
    built = [(data, job) for _, data, job in ready if job is not None]
    if express is None or not built:
        return [None] * len(ready)
    express.remember(solution)  # read just now
    calls = [
        (job, new_document(job["task_id"], solution.solution_id, job["created_at"],
                           job.get("metadata")),
         sends.recipients_of(data), data.get("hLimit"))
        for data, job in built
    ]  # fmt: skip
    answers = iter(express.send_many(calls, solution))
    return [None if job is None else next(answers) for _, _, job in ready]


def _key_of(raw: Any) -> tuple[str | None, str, Any]:
    """A message's own idempotency key (checked: 400 naming it), the message's fingerprint,
    and the message without the key; ``(None, "", raw)`` for a message without one."""
    if not isinstance(raw, dict) or KEY not in raw:
        return None, "", raw
    message = {k: v for k, v in raw.items() if k != KEY}
    return sends.idempotency_key(raw[KEY], KEY), body_fingerprint(message), message


def _alone(
    svc: Services,
    sid: str,
    index: int,
    data: dict[str, Any],
    known: tuple[Principal, Solution],
    keyed: tuple[str, str] | None = None,
) -> dict[str, Any]:
    """One message on the usual path (under its idempotency key and fingerprint, if
    ``keyed``): its queued entry or its refusal."""
    try:
        if keyed is not None:
            task_id, _ = sends.queue_keyed(svc, sid, data, *keyed, known, KEY)
        else:
            job, _ = sends.judged_job(svc, sid, data, known)
            sends.queue(svc, job, data["attachments"])
            task_id = job["task_id"]
    except PostroomError as err:
        return _refused(index, err)
    except (RedisConnectionError, RedisTimeoutError):
        return _refused(index, ServiceUnavailable(STORE_AWAY))
    return _queued(index, sid, task_id, sends.state_of_request(data))
