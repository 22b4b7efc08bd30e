"""``POST /solutions/{sid}/email``: validate, check, enqueue, answer 202 at once."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify, request, url_for

from api.auth import require_solution
from api.body import json_object
from api.intake import body_fingerprint, build_job
from api.services import Services, services
from shared.documents import new_document
from shared.errors import IdempotencyMismatch, RateLimited, ValidationError
from shared.idempotency import Claim
from shared.ratelimit import Decision
from shared.schemas import check_sender, load_or_raise

bp = Blueprint("email", __name__)

MAX_WAIT_S = 30


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


def _accepted(sid: str, task_id: str, decision: Decision | None) -> Response:
    location = url_for("tasks.show", sid=sid, task_id=task_id)
    response = jsonify({"task_id": task_id, "state": "queued", "links": {"self": location}})
    response.status_code = 202
    response.headers["Location"] = location
    if decision is not None:
        _rate_headers(response, decision)
    return response


def _rate_headers(response: Response, decision: Decision) -> None:
    response.headers["RateLimit-Limit"] = str(decision.limit)
    response.headers["RateLimit-Remaining"] = str(decision.remaining)
    response.headers["RateLimit-Reset"] = str(int(decision.reset_after + 0.999))


def _replay(svc: Services, sid: str, claim: Claim, fingerprint: str) -> Response:
    if claim.fingerprint != fingerprint:
        raise IdempotencyMismatch(
            "this Idempotency-Key was used with another request body in the last 24 hours"
        )
    return _accepted(sid, claim.task_id, None)


@bp.post("/solutions/<sid>/email")
def send(sid: str) -> Response | tuple[Response, int]:
    svc = services()
    require_solution(svc.principal(), sid)
    solution = svc.solutions.get(sid)
    wait = _wait_seconds()
    body = json_object()
    idem_key = request.headers.get("Idempotency-Key")
    fingerprint = body_fingerprint(body) if idem_key else ""
    if idem_key:
        earlier = svc.idempotency.get(sid, idem_key)
        if earlier is not None:
            return _replay(svc, sid, earlier, fingerprint)

    data: dict[str, Any] = load_or_raise(svc.schemas.send, body)
    check_sender(data, solution.config)

    # an early answer when the bucket is empty now (a peek: the worker takes the token)
    decision = svc.bucket.peek(sid, solution.hlimit, data.get("hLimit"))
    if not decision.allowed and (decision.retry_after is None or solution.policy == "reject"):
        raise RateLimited(
            "the hourly sending limit (hLimit) is used up",
            retry_after=decision.retry_after,
            hLimit=decision.limit,
        )

    job = build_job(data, solution, svc.settings, svc.box)
    task_id = job["task_id"]
    if idem_key:
        earlier = svc.idempotency.claim(sid, idem_key, Claim(fingerprint, task_id))
        if earlier is not None:
            return _replay(svc, sid, earlier, fingerprint)

    svc.documents.put(new_document(task_id, sid, job["created_at"]))
    try:
        svc.enqueuer.enqueue(job)
    except Exception:
        svc.documents.delete(sid, task_id)
        if idem_key:
            svc.idempotency.release(sid, idem_key)
        raise

    if wait is not None:
        doc = svc.documents.wait_final(sid, task_id, wait)
        if doc is not None:
            response = jsonify(doc)
            _rate_headers(response, decision)
            return response, 200
    return _accepted(sid, task_id, decision)
