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
one more judges and queues every message by the one-step script in a single transaction
(:func:`postroom.api.intake.pipeline.accept_batch`). A message that script does not queue (a
recipient suppressed, an empty bucket, the record changed meanwhile) is checked and queued
on its own and gets that answer. Like single sends, the batch only peeks at the bucket: the
worker takes each message's token, so a batch larger than the tokens left is accepted and
its surplus ends ``RateLimited`` (or waits, under ``defer``).
"""

from __future__ import annotations

import logging
from typing import Any

from flask import Blueprint, Response, jsonify, request

from postroom.api.body import json_object
from postroom.api.intake.checks import load_send
from postroom.api.intake.idempotency import idempotency_key, replayed
from postroom.api.intake.job import body_fingerprint
from postroom.api.intake.pipeline import Accepted, Keyed, accept_batch
from postroom.api.routes import tasks
from postroom.api.services import services
from postroom.shared.errors import PostroomError, ValidationError
from postroom.shared.records import SendRequest
from postroom.shared.schemas import load_or_raise

bp = Blueprint("batch", __name__)
log = logging.getLogger("postroom.api")

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


def _queued(index: int, sid: str, accepted: Accepted) -> dict[str, Any]:
    link = tasks.link(sid, accepted.task_id)
    return {"index": index, "status": 202, "task_id": accepted.task_id,
            "state": accepted.state, "links": {"self": link}}  # fmt: skip


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
    _, solution = svc.authorize(sid)

    results: list[dict[str, Any]] = [{} for _ in messages]
    loaded: list[tuple[int, SendRequest, Keyed | None]] = []
    for index, raw in enumerate(messages):
        try:
            keyed, raw = _key_of(raw)
            if keyed is not None:  # a replay is answered before the schema can refuse it
                earlier = svc.idempotency.get(sid, keyed.key)
                if earlier is not None:
                    task_id = replayed(earlier, keyed.fingerprint, KEY)
                    results[index] = _queued(index, sid, Accepted(task_id))
                    continue
            loaded.append((index, load_send(svc, sid, raw), keyed))
        except PostroomError as err:
            results[index] = _refused(index, err)
    answers = accept_batch(svc, solution, [(data, keyed) for _, data, keyed in loaded])
    for (index, _, _), answer in zip(loaded, answers, strict=True):
        results[index] = (_refused(index, answer) if isinstance(answer, PostroomError)
                          else _queued(index, sid, answer))  # fmt: skip
    queued = sum(1 for r in results if r["status"] == 202)
    log.info("batch queued", extra={"solution_id": sid, "queued": queued,
                                    "refused": len(results) - queued})  # fmt: skip
    body = {"queued": queued, "refused": len(results) - queued, "results": results}
    return jsonify(body), 200


def _key_of(raw: Any) -> tuple[Keyed | None, Any]:
    """A message's own idempotency key (checked: 400 naming it) with the fingerprint of the
    message without it, and that message; ``(None, raw)`` for a message without one."""
    if not isinstance(raw, dict) or KEY not in raw:
        return None, raw
    message = {k: v for k, v in raw.items() if k != KEY}
    return Keyed(idempotency_key(raw[KEY], KEY), body_fingerprint(message), KEY), message
