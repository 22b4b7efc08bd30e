"""What a send must know before it is queued, read from Redis in one round trip.

Four reads a send needs — whose token it is, the solution, which recipients are on its
suppression list, and its hLimit bucket (a peek, with the capacity read from the solution's
record by the same script: ``postroom/shared/lua/intake_peek.lua``) — go in one pipeline. The
verdicts are then given in the route's order (401, 404, the sender and relay checks, 429
``Blocked``, 429 ``RateLimited``); nothing read here changes anything in Redis.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from redis.exceptions import NoScriptError

from postroom.api.auth import Principal, allowed, bearer_token, is_admin
from postroom.api.services import Services
from postroom.shared.errors import NotFound
from postroom.shared.ratelimit import Decision, decision_of
from postroom.shared.solutions import Solution


@dataclass(frozen=True)
class Admission:
    principal: Principal
    solution: Solution
    #: recipients on the suppression list now
    blocked: list[str]
    #: what a take from the hLimit bucket(s) would answer now
    decision: Decision


def admit(
    svc: Services,
    sid: str,
    recipients: Iterable[str],
    request_hlimit: int | None,
    known: tuple[Principal, Solution] | None = None,
) -> Admission:
    """The caller (401/404 as :func:`postroom.api.auth.authorize`), solution ``sid``, the blocked
    ``recipients`` and the bucket, in one round trip. With ``known`` (the caller was
    authorized already), only the suppressions and the bucket are read."""
    pipe = svc.state.pipeline(transaction=False)
    admin = False
    if known is None:
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

    if known is None:
        principal, solution = allowed(admin, *read_caller(replies), sid)
    else:
        principal, solution = known
    blocked = read_blocked(None if blocked_at is None else replies[blocked_at])
    peek = replies[-1]
    if peek is None:  # the solution was deleted since a known caller was authorized
        raise NotFound(f"solution {sid!r} not found")
    return Admission(principal, solution, blocked, decision_of(peek))
