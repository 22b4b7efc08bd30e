"""What a send must pass before it is queued, and the one round trip that reads it all.

The checks, in the order their refusals are given: the caller's token (401), the solution
(404), ``from`` (400), the caller's relay (400 ``InvalidRelay``), the suppression list (429
``Blocked``), the hLimit bucket (429 ``RateLimited``). Four reads serve them — whose token
it is, the solution, which recipients are suppressed, and the bucket (a peek, with the
capacity read from the solution's record by the same script:
``shared/lua/intake_peek.lua``)
— and go to Redis in one pipeline; nothing read here changes anything in Redis.
"""

from __future__ import annotations

from typing import Any, cast

from redis.exceptions import NoScriptError

from postroom.api.auth import allowed, bearer_token, is_admin
from postroom.api.intake.job import build_job
from postroom.api.services import Services
from postroom.api.templates.rendering import apply_template
from postroom.shared.errors import Blocked, NotFound, RateLimited
from postroom.shared.ratelimit import Decision, decision_of
from postroom.shared.records import Job, RelaySpec, SendRequest
from postroom.shared.schemas import check_sender, load_or_raise
from postroom.shared.solutions import Solution


def load_send(svc: Services, sid: str, body: Any) -> SendRequest:
    """``body`` loaded by the send schema (400), its template rendered (400)."""
    data = cast(SendRequest, load_or_raise(svc.schemas.send, body))
    apply_template(svc, sid, data)
    return data


def check_relay(svc: Services, relay: RelaySpec | None, from_request: bool) -> None:
    """The caller's own relay may not point inside (400 ``InvalidRelay``); plain text
    toward it is a 400 naming ``connection.scheme`` when the request gave it."""
    if relay is not None:
        field = ["connection", "scheme"] if from_request else None
        svc.check_relay(relay["host"], relay["port"], relay["scheme"], field)


def checked_job(svc: Services, data: SendRequest, solution: Solution) -> Job:
    """The job of ``data`` once ``from`` and its relay pass on ``solution``; else raises."""
    check_sender(data, solution.config)
    job = build_job(data, solution, svc.settings, svc.box)
    check_relay(svc, job["relay"], bool(data.get("connection")))
    return job


def judge(svc: Services, sid: str, data: SendRequest) -> tuple[Solution, Job, Decision]:
    """Every check of one send, read in one round trip: the solution as read, the job built
    from it and the bucket's answer, or the refusal raised."""
    solution, blocked, decision = _read(svc, sid, recipients_of_request(data), data["hLimit"])
    job = checked_job(svc, data, solution)
    if blocked:
        raise Blocked.recipients(blocked)
    # an early answer when the bucket is empty now (a peek: the worker takes the token);
    # under "defer" an empty bucket is no refusal (the message waits in line), hLimit 0 is
    # (a scheduled send is not judged on the bucket now: its token is taken when it is sent)
    if (not decision.allowed and "send_at" not in job
            and (decision.retry_after is None or solution.policy == "reject")):  # fmt: skip
        raise RateLimited(
            "the hourly sending limit (hLimit) is used up",
            retry_after=decision.retry_after,
            hLimit=decision.limit,
        )
    return solution, job, decision


def recipients_of_request(data: SendRequest) -> list[str]:
    return [*data["to"], *data["cc"], *data["bcc"]]


def _read(
    svc: Services, sid: str, recipients: list[str], request_hlimit: int | None
) -> tuple[Solution, list[str], Decision]:
    """The caller (401/404 as :func:`postroom.api.auth.authorize`), solution ``sid``, the suppressed
    ``recipients`` and the bucket's answer to a peek, in one round trip."""
    pipe = svc.state.pipeline(transaction=False)
    token = bearer_token()
    admin = is_admin(token, svc.settings.admin_token)
    read_caller = svc.solutions.queue_owner_and_get(pipe, None if admin else token, sid)
    before = len(pipe)
    read_blocked = svc.suppressions.queue_blocked(pipe, sid, recipients)
    blocked_at = before if len(pipe) > before else None
    peek_alone = svc.bucket.queue_intake_peek(
        pipe, sid, request_hlimit, svc.settings.hlimit_default
    )
    replies: list[Any] = pipe.execute(raise_on_error=False)
    if isinstance(replies[-1], NoScriptError):  # Redis restarted: load the script, run it
        replies[-1] = peek_alone()
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
    _, solution = allowed(admin, *read_caller(replies), sid)
    blocked = read_blocked(None if blocked_at is None else replies[blocked_at])
    peek = replies[-1]
    if peek is None:  # the solution was deleted between the pipeline's reads
        raise NotFound(f"solution {sid!r} not found")
    return solution, blocked, decision_of(peek)

