"""``POST /solutions/{sid}/email``: read the request, take it through the intake, answer
202 at once.

The order of the answers: token, solution, ``?wait``, the body (415/400), an
``Idempotency-Key`` replay (answered before anything else can refuse it), the schema
(400), then the intake's checks (:mod:`postroom.api.intake.checks`). Nothing is enqueued unless
every check passes. The body is read before the token is checked, but a bad token or an
unknown solution is still the answer a bad body gets.
"""

from __future__ import annotations

import json
import logging
import math

from flask import Blueprint, Response, jsonify, request

from postroom.api.body import json_object
from postroom.api.intake.checks import load_send
from postroom.api.intake.idempotency import idempotency_key, replayed
from postroom.api.intake.job import body_fingerprint
from postroom.api.intake.pipeline import Accepted, Keyed, accept, accept_keyed
from postroom.api.routes import tasks
from postroom.api.services import Services, services
from postroom.shared.errors import PostroomError, ValidationError
from postroom.shared.ratelimit import Decision

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
    return None if key is None else idempotency_key(key, KEY_HEADER)


def _accepted(sid: str, task_id: str, decision: Decision | None,
              state: str = "queued") -> Response:  # fmt: skip
    """The 202, built directly rather than through ``url_for`` and ``jsonify`` (the same
    body and headers, for less: ``docs/throughput.md``)."""
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
    authorized = False
    try:
        wait = _wait_seconds()
        body = json_object()
        key = _idempotency_key()
        keyed = None if key is None else Keyed(key, body_fingerprint(body), KEY_HEADER)
        if keyed is not None:  # a replay is answered before the schema can refuse the body
            svc.authorize(sid)
            authorized = True
            earlier = svc.idempotency.get(sid, keyed.key)
            if earlier is not None:
                task_id = replayed(earlier, keyed.fingerprint, KEY_HEADER)
                return _accepted(sid, task_id, None)
        data = load_send(svc, sid, body)
    except PostroomError:
        if not authorized:
            svc.authorize(sid)  # a bad token or an unknown solution is answered first
        raise
    accepted = accept(svc, sid, data) if keyed is None else accept_keyed(svc, sid, data, keyed)
    if accepted.decision is None:  # another request took the key meanwhile: its task
        return _accepted(sid, accepted.task_id, None)
    return _queued(svc, sid, accepted, wait)


def _queued(svc: Services, sid: str, accepted: Accepted, wait: int | None,
            ) -> Response | tuple[Response, int]:  # fmt: skip
    task_id, decision = accepted.task_id, accepted.decision
    assert decision is not None
    log.info("queued", extra={"task_id": task_id, "solution_id": sid})
    if wait is not None:
        final = svc.documents.wait_final(sid, task_id, wait)
        if final is not None:
            response = jsonify(final)
            response.headers.extend(rate_headers(decision))
            return response, 200
    return _accepted(sid, task_id, decision, accepted.state)
