"""``POST /solutions/{sid}/email``: validate, check, enqueue, answer 202 at once.

The checks, in order: token, solution, ``?wait``, the body (415/400), an
``Idempotency-Key`` replay (answered before anything else can refuse it), the schema
(400), ``from`` (400), the caller's relay (400 ``InvalidRelay``), the suppression list
(429 ``Blocked``), the hLimit bucket (429 ``RateLimited``). Nothing is enqueued unless
every check passes.

A send that passes reaches Redis twice: once for everything the checks read (the token,
the solution, the suppressions, the bucket: :mod:`api.admission`), once to queue it. When
this process has seen the solution pass before, once: the checks and the queueing in one
script (:mod:`api.express`), falling back to the two steps on any other finding. The body
is read before the token is checked, but a bad token or an unknown solution is still the
answer a bad body gets.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any

from flask import Blueprint, Response, jsonify, request, url_for

from api.admission import admit
from api.auth import Principal
from api.body import json_object
from api.intake import body_fingerprint, build_job
from api.services import Services, services
from shared.documents import new_document
from shared.errors import (
    Blocked,
    IdempotencyMismatch,
    PostroomError,
    RateLimited,
    ValidationError,
)
from shared.idempotency import Claim
from shared.ratelimit import Decision
from shared.relays import DEFAULT_PORTS
from shared.schemas import check_sender, load_or_raise
from shared.schemas.text import CONTROL
from shared.solutions import Solution

bp = Blueprint("email", __name__)
log = logging.getLogger("postroom.api")

MAX_WAIT_S = 30
MAX_IDEMPOTENCY_KEY = 255
_KEY_CONTROL = re.compile(f"[{CONTROL}]")


def _wait_seconds() -> int | None:
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
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY or _KEY_CONTROL.search(key):
        raise ValidationError(
            "invalid Idempotency-Key header",
            fields={"Idempotency-Key": ["Must be 1 to 255 characters, no control characters."]},
        )
    return key


def _check_relay(svc: Services, data: dict[str, Any], solution: Solution) -> None:
    """The caller's own relay (the request's, else the solution's) may not point inside."""
    conn = data.get("connection")
    if conn:
        svc.check_relay(conn["server"], conn["port"], conn["scheme"], ["connection", "scheme"])
    elif solution.has_own_relay:
        cfg = solution.config
        scheme = cfg.get("connection_scheme") or ""
        port = cfg.get("connection_port") or DEFAULT_PORTS[scheme]
        svc.check_relay(str(cfg["connection_server"]), int(port), scheme, None)


def _check_suppressions(blocked: list[str]) -> None:
    if blocked:
        which = "a recipient is" if len(blocked) == 1 else f"{len(blocked)} recipients are"
        raise Blocked(f"{which} on the suppression list; nothing was sent", blocked=blocked)


def _accepted(sid: str, task_id: str, decision: Decision | None) -> Response:
    location = url_for("tasks.show", sid=sid, task_id=task_id)
    response = jsonify({"task_id": task_id, "state": "queued", "links": {"self": location}})
    response.status_code = 202
    response.headers["Location"] = location
    if decision is not None:
        _rate_headers(response, decision)
    return response


def _rate_headers(response: Response, decision: Decision) -> None:
    """``RateLimit-*`` (IETF httpapi ratelimit headers) of the tighter bucket, counting the
    token this message will take: whole tokens left, seconds until full, ``C;w=P``."""
    period_s = services().settings.hlimit_period_s
    token_s = period_s / decision.limit if decision.limit else 0.0
    response.headers["RateLimit-Limit"] = str(decision.limit)
    response.headers["RateLimit-Remaining"] = str(max(0, decision.remaining - 1))
    response.headers["RateLimit-Reset"] = str(math.ceil(decision.reset_after + token_s))
    response.headers["RateLimit-Policy"] = f"{decision.limit};w={period_s}"


def _replay(svc: Services, sid: str, claim: Claim, fingerprint: str) -> Response:
    if claim.fingerprint != fingerprint:
        raise IdempotencyMismatch(
            "this Idempotency-Key was used with another request body in the last 24 hours"
        )
    return _accepted(sid, claim.task_id, None)


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
                return _replay(svc, sid, earlier, fingerprint)
        data: dict[str, Any] = load_or_raise(svc.schemas.send, body)
    except PostroomError:
        if known is None:
            svc.authorize(sid)  # a bad token or an unknown solution is answered first
        raise

    recipients = [*data["to"], *data["cc"], *data["bcc"]]
    if idem_key is None:
        queued = _send_in_one_step(svc, sid, data, recipients)
        if queued is not None:
            return _queued(svc, sid, *queued, wait)

    # the caller, the solution, the suppressions and the bucket: one round trip
    admission = admit(svc, sid, recipients, data.get("hLimit"), known)
    solution = admission.solution
    check_sender(data, solution.config)
    _check_relay(svc, data, solution)
    _check_suppressions(admission.blocked)

    # an early answer when the bucket is empty now (a peek: the worker takes the token);
    # under "defer" an empty bucket is no refusal (the message waits in line), hLimit 0 is
    decision = admission.decision
    if not decision.allowed and (decision.retry_after is None or solution.policy == "reject"):
        raise RateLimited(
            "the hourly sending limit (hLimit) is used up",
            retry_after=decision.retry_after,
            hLimit=decision.limit,
        )
    if svc.express is not None and idem_key is None:
        svc.express.remember(solution)

    job = build_job(data, solution, svc.settings, svc.box)
    task_id = job["task_id"]
    if idem_key:
        earlier = svc.idempotency.claim(sid, idem_key, Claim(fingerprint, task_id))
        if earlier is not None:
            return _replay(svc, sid, earlier, fingerprint)

    doc = new_document(task_id, sid, job["created_at"])
    try:
        if svc.results is svc.state:  # the first document rides with the accepted entry
            svc.enqueuer.enqueue(job, with_writes=lambda pipe: svc.documents.put(doc, pipe=pipe))
        else:
            svc.documents.put(doc)
            svc.enqueuer.enqueue(job)
    except Exception:
        svc.documents.delete(sid, task_id)
        if idem_key:
            svc.idempotency.release(sid, idem_key, task_id)
        raise
    if idem_key:
        svc.idempotency.confirm(sid, idem_key, Claim(fingerprint, task_id))
    return _queued(svc, sid, task_id, decision, wait)


def _send_in_one_step(
    svc: Services, sid: str, data: dict[str, Any], recipients: list[str]
) -> tuple[str, Decision] | None:
    """Judge the send on this process's copy of the solution and queue it in one round
    trip (:mod:`api.express`); None when that path does not apply or did not queue it."""
    express = svc.express
    solution = express.known(sid) if express is not None else None
    if express is None or solution is None:
        return None
    try:
        check_sender(data, solution.config)
        _check_relay(svc, data, solution)
    except PostroomError:
        return None  # judged again, on the record as it is now
    job = build_job(data, solution, svc.settings, svc.box)
    doc = new_document(job["task_id"], sid, job["created_at"])
    decision = express.send(job, doc, recipients, data.get("hLimit"), solution)
    return None if decision is None else (job["task_id"], decision)


def _queued(
    svc: Services, sid: str, task_id: str, decision: Decision, wait: int | None
) -> Response | tuple[Response, int]:
    log.info("queued", extra={"task_id": task_id, "solution_id": sid})
    if wait is not None:
        final = svc.documents.wait_final(sid, task_id, wait)
        if final is not None:
            response = jsonify(final)
            _rate_headers(response, decision)
            return response, 200
    return _accepted(sid, task_id, decision)
