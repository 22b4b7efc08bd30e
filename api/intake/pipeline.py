"""The one path of a send, from a validated request to the queue.

- :func:`accept`: one send. For a solution this process has seen pass, the checks and the
  queueing run in one script (:mod:`postroom.api.intake.one_step`); otherwise, or when that script
  finds anything amiss, the send is checked in one round trip (:mod:`postroom.api.intake.checks`)
  and
  queued in a second (:mod:`postroom.api.intake.queueing`).
- :func:`accept_keyed`: a send under an idempotency key: checked, its key claimed, queued,
  its key confirmed (:mod:`postroom.api.intake.idempotency`).
- :func:`accept_batch`: the messages of one batch; those without a key go to the one-step
  script together, in one round trip, and any it does not queue take :func:`accept`'s
  second way alone, as do keyed ones.

Each split is kept for what it gains on this machine (``docs/throughput.md``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from postroom.api.intake.checks import checked_job, judge
from postroom.api.intake.idempotency import Claim, replayed
from postroom.api.intake.job import recipients_of, state_of
from postroom.api.intake.queueing import queue
from postroom.api.services import Services
from postroom.shared.errors import PostroomError, ServiceUnavailable
from postroom.shared.ratelimit import Decision
from postroom.shared.records import Job, SendRequest
from postroom.shared.solutions import Solution

STORE_AWAY = "the service's store is unavailable; this message was not accepted, retry it"


@dataclass(frozen=True)
class Accepted:
    """A send the queue has: its task, the state its document starts in, and the bucket's
    answer (None for a replay: the task of an earlier request under the same key)."""

    task_id: str
    state: str = "queued"
    decision: Decision | None = None


@dataclass(frozen=True)
class Keyed:
    """An idempotency key, the fingerprint of the body it came with, and what the caller
    calls it (``Idempotency-Key``, ``idempotency_key``)."""

    key: str
    fingerprint: str
    name: str


def accept(svc: Services, sid: str, data: SendRequest) -> Accepted:
    """Check ``data`` and queue it; the refusal raised (503 when the queue fails it)."""
    one_step = svc.one_step
    # split kept: one step gains over 10 % on intake (docs/throughput.md, the intake's paths)
    solution = one_step.known(sid) if one_step is not None else None
    if solution is not None:
        (accepted,) = _in_one_step(svc, solution, [data])
        if accepted is not None:
            return accepted
    return _in_two_steps(svc, sid, data)


def accept_keyed(svc: Services, sid: str, data: SendRequest, keyed: Keyed) -> Accepted:
    """Check ``data`` and queue it under ``keyed``, or answer with the task of an earlier
    request that took the key meanwhile. The key is claimed before the job is queued,
    confirmed once it is, and given up when queueing fails."""
    solution, job, decision = judge(svc, sid, data)
    _remember(svc, solution)
    claim = Claim(keyed.fingerprint, job["task_id"])
    earlier = svc.idempotency.claim(sid, keyed.key, claim)
    if earlier is not None:
        return Accepted(replayed(earlier, keyed.fingerprint, keyed.name))
    try:
        queue(svc, job, data["attachments"])
    except Exception:
        svc.idempotency.release(sid, keyed.key, job["task_id"])
        raise
    svc.idempotency.confirm(sid, keyed.key, claim)
    return Accepted(job["task_id"], state_of(job), decision)


def accept_batch(
    svc: Services, solution: Solution, sends: Sequence[tuple[SendRequest, Keyed | None]]
) -> list[Accepted | PostroomError]:
    """Each send of one batch accepted, or its refusal (a store that went away is this
    send's 503); ``solution`` was read for this request."""
    sid = solution.solution_id
    results: list[Accepted | PostroomError | None] = [None] * len(sends)
    unkeyed = [n for n, (_, keyed) in enumerate(sends) if keyed is None]
    # split kept: one transaction for the batch gains over 3x (docs/throughput.md)
    if svc.one_step is not None and unkeyed:
        _remember(svc, solution)
        answers = _in_one_step(svc, solution, [sends[n][0] for n in unkeyed])
        for n, answer in zip(unkeyed, answers, strict=True):
            results[n] = answer
    for n, (data, keyed) in enumerate(sends):
        if results[n] is None:
            results[n] = _alone(svc, sid, data, keyed)
    return [result for result in results if result is not None]


def _alone(svc: Services, sid: str, data: SendRequest, keyed: Keyed | None,
           ) -> Accepted | PostroomError:  # fmt: skip
    try:
        if keyed is not None:
            return accept_keyed(svc, sid, data, keyed)
        return _in_two_steps(svc, sid, data)
    except PostroomError as err:
        return err
    except (RedisConnectionError, RedisTimeoutError):
        return ServiceUnavailable(STORE_AWAY)


def _in_two_steps(svc: Services, sid: str, data: SendRequest) -> Accepted:
    solution, job, decision = judge(svc, sid, data)
    _remember(svc, solution)
    queue(svc, job, data["attachments"])
    return Accepted(job["task_id"], state_of(job), decision)


def _remember(svc: Services, solution: Solution) -> None:
    """Keep ``solution`` (read from Redis for this request) for the next send's one step."""
    if svc.one_step is not None:
        svc.one_step.remember(solution)


def _in_one_step(
    svc: Services, solution: Solution, sends: Sequence[SendRequest]
) -> list[Accepted | None]:
    """Each send judged on ``solution`` and queued by the one-step script, all in one round
    trip; None for one it did not queue. Attachments and a ``send_at`` take the two steps:
    their writes are not the script's; so does a send whose ``from`` or relay is refused
    on this copy of the record (the two steps judge it on the record as it is now)."""
    one_step = svc.one_step
    assert one_step is not None
    jobs = [_prepared(svc, data, solution) for data in sends]
    ready = [(job, recipients_of(job), data["hLimit"])
             for job, data in zip(jobs, sends, strict=True) if job is not None]  # fmt: skip
    decisions = iter(one_step.send_many(ready, solution) if ready else [])
    results: list[Accepted | None] = []
    for job in jobs:
        decision = None if job is None else next(decisions)
        results.append(None if job is None or decision is None
                       else Accepted(job["task_id"], "queued", decision))  # fmt: skip
    return results


def _prepared(svc: Services, data: SendRequest, solution: Solution) -> Job | None:
    if data["attachments"] or data["send_at"] is not None:
        return None
    try:
        return checked_job(svc, data, solution)
    except PostroomError:
        return None
