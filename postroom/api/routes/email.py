"""``POST /solutions/{sid}/email``: validate, check, enqueue, answer 202 at once.

The checks, in order: token, solution, ``?wait``, the body (415/400), an
``Idempotency-Key`` replay (answered before anything else can refuse it), the schema
(400), ``from`` (400), the caller's relay (400 ``InvalidRelay``), the suppression list
(429 ``Blocked``), the hLimit bucket (429 ``RateLimited``). Nothing is enqueued unless
every check passes.

A send that passes reaches Redis twice: once for everything the checks read (the token,
the solution, the suppressions, the bucket: :mod:`postroom.api.admission`), once to queue it. When
this process has seen the solution pass before, once: the checks and the queueing in one
script (:mod:`postroom.api.express`), falling back to the two steps on any other finding. The body
is read before the token is checked, but a bad token or an unknown solution is still the
answer a bad body gets.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

from flask import Blueprint, Response, jsonify, request

from postroom.api import sends
from postroom.api.auth import Principal
from postroom.api.body import json_object
from postroom.api.intake import body_fingerprint
from postroom.api.routes import tasks
from postroom.api.services import Services, services
from postroom.api.templates.rendering import apply_template
from postroom.shared.errors import PostroomError, ValidationError
from postroom.shared.ratelimit import Decision
from postroom.shared.schemas import load_or_raise
from postroom.shared.solutions import Solution

bp = Blueprint("email", __name__)
log = logging.getLogger("postroom.api")

MAX_WAIT_S = 30
KEY_HEADER = "Idempotency-Key"


def _wait_seconds() -> int | None:
    if not request.query_string:  # most sends: no query to parse
        return None
    raw = request.args.get("wait")
    if raw is None:
        return None
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_WAIT_S:
        raise ValidationError(
            "wait must be a whole number of seconds from 1 to 30",
            fields={"wait": ["Must be an integer from 1 to 30."]},
        )
    return int(raw)


def _idempotency_key() -> str | None:
    key = request.headers.get(KEY_HEADER)
    return None if key is None else sends.idempotency_key(key, KEY_HEADER)


def _accepted(sid: str, task_id: str, decision: Decision | None,
              state: str = "queued") -> Response:  # fmt: skip
    """The 202, built directly (not through ``url_for`` and ``jsonify``, which cost an
    accepted send a tenth of its time): the same body and headers."""
    location = tasks.link(sid, task_id)
    body = {"task_id": task_id, "state": state, "links": {"self": location}}
    headers = [("Location", location)]
    if decision is not None:
        headers += rate_headers(decision)
    return Response(json.dumps(body, separators=(",", ":")) + "\n", 202, headers,
                    mimetype="application/json")  # fmt: skip


def rate_headers(decision: Decision) -> list[tuple[str, str]]:
    """``RateLimit-*`` (IETF httpapi ratelimit headers) of the tighter bucket, counting the
    token this message will take: whole tokens left, seconds until full, ``C;w=P``."""
    period_s = services().settings.hlimit_period_s
    token_s = period_s / decision.limit if decision.limit else 0.0
    return [
        ("RateLimit-Limit", str(decision.limit)),
        ("RateLimit-Remaining", str(max(0, decision.remaining - 1))),
        ("RateLimit-Reset", str(math.ceil(decision.reset_after + token_s))),
        ("RateLimit-Policy", f"{decision.limit};w={period_s}"),
    ]


@bp.post("/solutions/<sid>/email")
def send(sid: str) -> Response | tuple[Response, int]:
    svc = services()
    known: tuple[Principal, Solution] | None = None
    try:
        wait = _wait_seconds()
        body = json_object()
        idem_key = _idempotency_key()
        fingerprint = body_fingerprint(body) if idem_key else ""
        if idem_key:  # a replay is answered before the schema can refuse the body
            known = svc.authorize(sid)
            earlier = svc.idempotency.get(sid, idem_key)
            if earlier is not None:
                return _accepted(sid, sends.replayed(earlier, fingerprint, KEY_HEADER), None)
        data: dict[str, Any] = load_or_raise(svc.schemas.send, body)
        apply_template(svc, sid, data)
    except PostroomError:
        if known is None:
            svc.authorize(sid)  # a bad token or an unknown solution is answered first
        raise

    if idem_key is not None:
        task_id, keyed = sends.queue_keyed(svc, sid, data, idem_key, fingerprint, known,
                                           KEY_HEADER)  # fmt: skip
        if keyed is None:  # another request took the key meanwhile: its task, as a replay
            return _accepted(sid, task_id, None)
        return _queued(svc, sid, task_id, keyed, wait, sends.state_of_request(data))

    queued = sends.in_one_step(svc, sid, data)
    if queued is not None:
        return _queued(svc, sid, *queued, wait)

    # the caller, the solution, the suppressions and the bucket: one round trip
    job, decision = sends.judged_job(svc, sid, data, known)
    sends.queue(svc, job, data["attachments"])
    return _queued(svc, sid, job["task_id"], decision, wait, sends.state_of(job))


def _queued(
    svc: Services, sid: str, task_id: str, decision: Decision, wait: int | None,
    state: str = "queued",
) -> Response | tuple[Response, int]:
    log.info("queued", extra={"task_id": task_id, "solution_id": sid})
    if wait is not None:
        final = svc.documents.wait_final(sid, task_id, wait)
        if final is not None:
            response = jsonify(final)
            response.headers.extend(rate_headers(decision))
            return response, 200
    return _accepted(sid, task_id, decision, state)
