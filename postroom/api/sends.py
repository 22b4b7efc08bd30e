"""What a validated send goes through before it is queued, for the one-message route and
the batch route alike.

- :func:`in_one_step`: judged on this process's copy of the solution and queued by one
  script (:mod:`postroom.api.express`), or None when that path does not apply or did not queue it;
- :func:`judge`: the usual checks, read from Redis in one round trip
  (:mod:`postroom.api.admission`): 401/404, ``from``, the relay, 429 ``Blocked``, 429
  ``RateLimited``;
- :func:`judged_job`: :func:`judge`, then the job built from the solution just read;
- :func:`queue`: the job, its first document and its accepted-set entry written, and the
  job published (503 when the broker or Redis does not take it, nothing left behind);
- :func:`idempotency_key`, :func:`replayed`, :func:`queue_keyed`: a send under an
  idempotency key (the single route's ``Idempotency-Key`` header, a batch message's
  ``idempotency_key``): the same key and body within 24 h is the same task, queued once
  (:mod:`postroom.shared.idempotency`).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Sequence
from typing import Any

from postroom.api import tasklist
from postroom.api.admission import admit
from postroom.api.auth import Principal
from postroom.api.intake import build_job
from postroom.api.services import Services
from postroom.shared import attachments as stored_attachments
from postroom.shared.documents import new_document
from postroom.shared.errors import (
    Blocked,
    IdempotencyMismatch,
    PostroomError,
    RateLimited,
    ValidationError,
)
from postroom.shared.idempotency import Claim
from postroom.shared.ratelimit import Decision
from postroom.shared.relays import DEFAULT_PORTS
from postroom.shared.schemas import check_sender
from postroom.shared.schemas.attachments import Attachment
from postroom.shared.schemas.validators import CONTROL
from postroom.shared.solutions import Solution, iso

MAX_IDEMPOTENCY_KEY = 255
_KEY_CONTROL = re.compile(f"[{CONTROL}]")


def recipients_of(data: dict[str, Any]) -> list[str]:
    return [*data["to"], *data["cc"], *data["bcc"]]


def check_relay(svc: Services, data: dict[str, Any], solution: Solution) -> None:
    """The caller's own relay (the request's, else the solution's) may not point inside."""
    conn = data.get("connection")
    if conn:
        svc.check_relay(conn["server"], conn["port"], conn["scheme"], ["connection", "scheme"])
    elif solution.has_own_relay:
        cfg = solution.config
        scheme = cfg.get("connection_scheme") or ""
        port = cfg.get("connection_port") or DEFAULT_PORTS[scheme]
        svc.check_relay(str(cfg["connection_server"]), int(port), scheme, None)


def check_suppressions(blocked: list[str]) -> None:
    if blocked:
        raise Blocked.recipients(blocked)


def judge(
    svc: Services,
    sid: str,
    data: dict[str, Any],
    known: tuple[Principal, Solution] | None = None,
) -> tuple[Solution, Decision]:
    """The usual checks of one send, in the route's order; the solution and the bucket's
    answer, or the refusal raised. ``known``: the caller was authorized already."""
    admission = admit(svc, sid, recipients_of(data), data.get("hLimit"), known)
    solution = admission.solution
    check_sender(data, solution.config)
    check_relay(svc, data, solution)
    check_suppressions(admission.blocked)
    # an early answer when the bucket is empty now (a peek: the worker takes the token);
    # under "defer" an empty bucket is no refusal (the message waits in line), hLimit 0 is
    # (a scheduled send is not judged on the bucket now: its token is taken when it is sent)
    decision = admission.decision
    if (not decision.allowed and not scheduled(data)
            and (decision.retry_after is None or solution.policy == "reject")):  # fmt: skip
        raise RateLimited(
            "the hourly sending limit (hLimit) is used up",
            retry_after=decision.retry_after,
            hLimit=decision.limit,
        )
    return solution, decision


def judged_job(
    svc: Services,
    sid: str,
    data: dict[str, Any],
    known: tuple[Principal, Solution] | None = None,
) -> tuple[dict[str, Any], Decision]:
    """:func:`judge`, then the job built from the solution as read just now (which this
    process keeps for the next send's one step); the job and the bucket's answer."""
    solution, decision = judge(svc, sid, data, known)
    if svc.express is not None:
        svc.express.remember(solution)
    return build_job(data, solution, svc.settings, svc.box), decision


def scheduled(data: dict[str, Any]) -> bool:
    """Whether the send is for later (``send_at`` in the future)."""
    send_at = data.get("send_at")
    return send_at is not None and send_at > time.time()


def state_of_request(data: dict[str, Any]) -> str:
    """The state a loaded send request's task starts in."""
    return "scheduled" if scheduled(data) else "queued"


def state_of(job: dict[str, Any]) -> str:
    """The state of a job's first document: ``scheduled`` for a send later, else ``queued``."""
    return "scheduled" if "send_at" in job else "queued"


def queue(svc: Services, job: dict[str, Any], attachments: Sequence[Attachment] = ()) -> None:
    """Write ``job``'s first document (and its attachments' bytes) and publish the job, or
    park it in the schedule until its ``send_at``; on failure, take the document back and
    raise (503).

    A scheduled job's document (and attachments) live ``POSTROOM_RESULT_TTL`` past its
    ``send_at``."""
    sid, task_id = job["solution_id"], job["task_id"]
    doc = new_document(task_id, sid, job["created_at"], job.get("metadata"))
    send_at = job.get("send_at")
    ttl_s = svc.documents.ttl_s
    if send_at is not None:
        doc.update(state="scheduled", next_attempt_at=iso(send_at))
        ttl_s += max(0, math.ceil(send_at - time.time()))
    same = svc.results is svc.state  # the first document rides with the accepted entry

    def first_writes(pipe: Any) -> None:  # the document and its task-list entry
        svc.documents.put(doc, pipe=pipe, ttl_s=ttl_s)
        tasklist.add_to(pipe, sid, task_id, job["created_at"], recipients_of(job["message"]),
                        ttl_s)

    def writes(pipe: Any) -> None:
        if same:
            first_writes(pipe)
        stored_attachments.queue_put(pipe, sid, task_id, attachments, ttl_s)

    try:
        if not same:
            pipe = svc.results.pipeline(transaction=True)
            first_writes(pipe)
            pipe.execute()
        if send_at is not None:
            svc.enqueuer.schedule(job, send_at, with_writes=writes)
        else:
            svc.enqueuer.enqueue(job, with_writes=writes if same or attachments else None)
    except Exception:
        svc.documents.delete(sid, task_id)
        if attachments:  # written beside the accepted entry, which the broker then refused
            stored_attachments.delete(svc.state, sid, task_id)
        raise


def prepared(svc: Services, data: dict[str, Any], solution: Solution) -> dict[str, Any] | None:
    """``data``'s job built from ``solution`` when ``from`` and the relay pass on it, else
    None (the usual path judges the send again, on the record as it is now). Attachments
    and a ``send_at`` take the usual path: their writes are not the one-step script's."""
    if data.get("attachments") or data.get("send_at") is not None:
        return None
    try:
        check_sender(data, solution.config)
        check_relay(svc, data, solution)
    except PostroomError:
        return None
    return build_job(data, solution, svc.settings, svc.box)


def in_one_step(svc: Services, sid: str, data: dict[str, Any]) -> tuple[str, Decision] | None:
    """Judge the send on this process's copy of the solution and queue it in one round
    trip (:mod:`postroom.api.express`); None when that path does not apply or did not queue it."""
    express = svc.express
    solution = express.known(sid) if express is not None else None
    if express is None or solution is None:
        return None
    job = prepared(svc, data, solution)
    if job is None:
        return None
    doc = new_document(job["task_id"], sid, job["created_at"], job.get("metadata"))
    decision = express.send(job, doc, recipients_of(data), data.get("hLimit"), solution)
    return None if decision is None else (job["task_id"], decision)


def idempotency_key(value: Any, field: str) -> str:
    """``value`` as an idempotency key: 1 to 255 characters, no control characters; else a
    400 naming ``field``."""
    if (not isinstance(value, str) or not 1 <= len(value) <= MAX_IDEMPOTENCY_KEY
            or _KEY_CONTROL.search(value)):  # fmt: skip
        raise ValidationError(
            f"invalid {field}",
            fields={field: ["Must be 1 to 255 characters, no control characters."]},
        )
    return value


def replayed(claim: Claim, fingerprint: str, name: str) -> str:
    """The task an earlier request with the same key made; 422 when its body differed
    (``name``: what the caller calls the key)."""
    if claim.fingerprint != fingerprint:
        raise IdempotencyMismatch(
            f"this {name} was used with another request body in the last 24 hours"
        )
    return claim.task_id


def queue_keyed(
    svc: Services,
    sid: str,
    data: dict[str, Any],
    key: str,
    fingerprint: str,
    known: tuple[Principal, Solution] | None,
    name: str,
) -> tuple[str, Decision | None]:
    """Judge ``data`` and queue it under ``key``: its task and the bucket's answer, or the
    task of an earlier request that took the key meanwhile (and None). The key is claimed
    before the job is queued, confirmed once it is, and given up when queueing fails."""
    job, decision = judged_job(svc, sid, data, known)
    task_id = job["task_id"]
    earlier = svc.idempotency.claim(sid, key, Claim(fingerprint, task_id))
    if earlier is not None:
        return replayed(earlier, fingerprint, name), None
    try:
        queue(svc, job, data.get("attachments") or ())
    except Exception:
        svc.idempotency.release(sid, key, task_id)
        raise
    svc.idempotency.confirm(sid, key, Claim(fingerprint, task_id))
    return task_id, decision
