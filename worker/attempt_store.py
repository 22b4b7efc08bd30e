"""The Redis side of one delivery attempt, in as few round trips as it allows.

On the way of a message sent at its first try an attempt meets Redis twice (three times
for a later attempt, or with a result backend of its own):

1. :func:`begin` — one script (``shared/lua/attempt_begin.lua``): take the message's lease,
   read its ledger, its solution, its recipients' suppression entries and, when the result
   backend is the same Redis, its task document (otherwise that is one GET before);
2. the hLimit take (``TokenBucket.take`` with ``attempt``), which also marks the attempt
   ``sending`` in the ledger — in the step that lets it send, never for a refused take.
   For a message at its first attempt (its document as the intake wrote it, its ledger
   empty) :func:`begin` makes this take itself, in the same script, when asked
   (:class:`FirstTake`): the same bucket script, keys and arguments, one round trip less;
3. :func:`finish` — one pipeline: a script (``shared/lua/attempt_finish.lua``) records the
   outcomes in the ledger, writes the document (and queues the delivery events it makes:
   :mod:`postroom.shared.events`), releases the lease; beside it, the job is
   parked in the schedule or taken out of the accepted set, and the transition counted.
   With a result backend of its own: the ledger first, then the document, then the rest.

In a batch (:mod:`postroom.worker.batching`) one round trip serves two messages: the pipeline of one
message's :func:`finish` carries the next message's :func:`begin` (``then``, made ready by
:func:`prepare_begin`), so a batch of n messages meets Redis n + 1 times rather than 2n. The
begin is the same script with the same effects, run a moment earlier; its answer is used
only when it is a plain one (:func:`begun_from_answer`), and otherwise the next attempt begins
on its own, as it would after any error: the script is safe to run again (the lease is
its holder's, the first take once per message).

The scripts touch only keys of the solution's hash tag; the service-wide keys (schedule,
accepted set, counters) are plain commands in the same pipeline. Scripts run by EVALSHA,
and one that Redis forgot (a restart) is loaded again and run on its own.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError
from redis.exceptions import TimeoutError as RedisTimeoutError

from postroom.shared import keys
from postroom.shared.documents import FINAL
from postroom.shared.events import email_event_types, emit, finish_events
from postroom.shared.queue import encode_job
from postroom.shared.ratelimit import Decision, decision_of
from postroom.shared.records import Job, TaskDocument
from postroom.shared.redis_client import is_cluster
from postroom.shared.redis_values import as_str
from postroom.shared.schemas.addresses import address_key
from postroom.shared.scripts import Lua, script
from postroom.shared.solutions import Solution
from postroom.shared.suppressions import in_force
from postroom.worker.lease import holder, holder_dead
from postroom.worker.ledger import LedgerState, Outcomes
from postroom.worker.resources import WorkerContext


@dataclass(frozen=True)
class Begun:
    """What :func:`begin` found. ``leased`` false: another worker holds the message for
    ``lease_left_s`` more seconds, or the document is final already (then nothing else was
    looked at)."""

    doc: TaskDocument | None
    leased: bool
    lease_left_s: float = 0.0
    ledger: LedgerState = field(default_factory=LedgerState)
    #: None: the solution was deleted
    solution: Solution | None = None
    #: the first attempt's hLimit take, when :func:`begin` made it (see :class:`FirstTake`)
    take: Decision | None = None
    #: the recipients on the solution's suppression list now
    suppressed: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class FirstTake:
    """Asks :func:`begin` to take the hLimit token of a message at its first attempt, as
    ``TokenBucket.take(sid, solution.hlimit(default_capacity), request_capacity,
    once_key=ledger, attempt=1, ledger_ttl_s=...)`` would, with the capacity read from the
    solution's record in the same step. Only when the result backend is postroom's Redis."""

    period_s: float
    request_capacity: int | None
    ledger_ttl_s: int
    #: the capacity of a record that names no hLimit (``POSTROOM_HLIMIT_DEFAULT``)
    default_capacity: int


@dataclass(frozen=True)
class BeginCall:
    """``attempt_begin.lua``'s keys and arguments for one message (:func:`begin`), made
    ready to run beside another message's :func:`finish` (its ``then``)."""

    keys: list[str]
    args: list[str | int]
    recipients: Sequence[str]


def _begin_call(
    sid: str,
    task_id: str,
    lease_s: float,
    first_take: FirstTake | None,
    recipients: Sequence[str],
    same: bool,
) -> BeginCall:
    script_keys = [
        keys.ledger(sid, task_id),
        keys.lease(sid, task_id),
        keys.solution(sid),
        keys.suppressions(sid),
    ]
    me, ttl_ms = holder(), max(1, int(lease_s * 1000))
    args: list[str | int] = [me, ttl_ms, "", "", "", "", ""]
    if same:
        script_keys.append(keys.task(sid, task_id))
        if first_take is not None:
            request = first_take.request_capacity
            script_keys.append(keys.bucket(sid))
            if request is not None:
                script_keys.append(keys.request_bucket(sid, request))
            args[3:7] = [
                repr(first_take.period_s),
                first_take.default_capacity,  # as postroom.shared.solutions.hlimit_of
                -1 if request is None else request,
                first_take.ledger_ttl_s,
            ]
    args += [address_key(email) for email in recipients]
    return BeginCall(script_keys, args, recipients)


def begin(
    ctx: WorkerContext,
    sid: str,
    task_id: str,
    lease_s: float,
    first_take: FirstTake | None = None,
    recipients: Sequence[str] = (),
) -> Begun:
    """Take the message's lease and read its document, ledger, solution and the suppression
    entries of ``recipients``; with ``first_take``, take the token of a message at its
    first attempt too (not when a recipient has a suppression entry)."""
    same = ctx.one_redis
    doc: TaskDocument | None = None
    if not same:
        doc = ctx.documents.get(sid, task_id)
        if doc is not None and doc["state"] in FINAL:
            return Begun(doc, leased=False)
    call = _begin_call(sid, task_id, lease_s, first_take, recipients, same)
    run = _begin_script()
    answer = run(ctx.state, call.keys, call.args)
    if _held_by_the_dead(ctx, answer):
        call.args[2] = as_str(answer[1])
        answer = run(ctx.state, call.keys, call.args)
    return _begun(answer, recipients, doc, same)


# Kept split (carried begins): in a batch, n + 1 round trips instead of 2n pay about 10 %
# of the worker's CPU per message and of the drain rate (docs/throughput.md).
def prepare_begin(
    ctx: WorkerContext,
    sid: str,
    task_id: str,
    lease_s: float,
    first_take: FirstTake | None,
    recipients: Sequence[str],
) -> BeginCall | None:
    """:func:`begin` made ready to run in the same round trip as the previous message's
    :func:`finish` (a batch's next message); None when the result backend is not this
    Redis (begin then reads the document first)."""
    if not ctx.one_redis:
        return None
    return _begin_call(sid, task_id, lease_s, first_take, recipients, same=True)


def begun_from_answer(ctx: WorkerContext, call: BeginCall, answer: Any) -> Begun | None:
    """What a :class:`BeginCall` run by :func:`finish` found; None when its answer is not
    to be used (an error, or a lease held by a dead process here, which :func:`begin`
    itself takes over): the attempt then begins as usual."""
    if answer is None or isinstance(answer, Exception) or _held_by_the_dead(ctx, answer):
        return None
    return _begun(answer, call.recipients, None, same=True)


def _begin_script() -> Lua:
    """``attempt_begin.lua`` with the bucket it calls (loaded once per process)."""
    return script("attempt_begin", functions=("bucket",))


def _held_by_the_dead(ctx: WorkerContext, answer: Any) -> bool:
    return not answer[0] and answer[1] is not None and holder_dead(ctx.state, as_str(answer[1]))


def _begun(answer: Any, recipients: Sequence[str], doc: TaskDocument | None,
           same: bool) -> Begun:  # fmt: skip
    leased, _, lease_ms, raw_doc = answer[:4]
    if same and raw_doc is not None:
        doc = cast(TaskDocument, json.loads(raw_doc))
    if not leased:
        return Begun(doc, leased=False, lease_left_s=max(0.0, int(lease_ms) / 1000.0))
    raw_solution, flat, take, listed = answer[4], answer[5], answer[6], answer[7]
    return Begun(
        doc,
        leased=True,
        ledger=LedgerState.from_fields(dict(zip(flat[::2], flat[1::2], strict=True))),
        solution=_solution(raw_solution),
        take=None if take is None else decision_of(take),
        suppressed=in_force(recipients, listed),
    )


def finish(
    ctx: WorkerContext,
    job: Job,
    *,
    doc: TaskDocument | None = None,
    transition: str | None = None,
    outcomes: Outcomes | None = None,
    release: bool = False,
    schedule_at: float | None = None,
    forget: bool = False,
    then: BeginCall | None = None,
) -> Any:
    """End an attempt: record ``outcomes`` (the attempt talked SMTP) in the ledger, write
    ``doc``, release the lease (``release``), park the job until ``schedule_at``, take it
    out of the accepted set (``forget``: its document is final), count ``transition``.

    ``then``: the begin of the next message (:func:`prepare_begin`), run in the same round
    trip after everything else; its raw answer is returned (an exception when it failed,
    None when it was not run), for :func:`begun_from_answer`.

    The ledger gets the document's time to live. When Redis does not answer, outcomes
    already read from the relay are written on their own first, with patience
    (:meth:`postroom.worker.ledger.Ledger.record`), and the error is raised."""
    sid, task_id = job["solution_id"], job["task_id"]
    same = ctx.one_redis
    if not same:
        # the ledger before the document, the document before anything says it is done
        if outcomes is not None:
            ctx.ledger.record(sid, task_id, outcomes.recipients, outcomes.response)
            outcomes = None
        if doc is not None:
            ctx.documents.put(doc)
            emit(ctx.state, sid, [(kind, doc) for kind in email_event_types(doc)])
            doc = None
        then = None  # its document is elsewhere: begin reads it on its own
    script_keys = [keys.ledger(sid, task_id), keys.lease(sid, task_id)]
    doc_json, channel, state, events = "", "", "", ""
    if doc is not None:
        script_keys.append(keys.task(sid, task_id))
        doc_json = ctx.documents.encode(doc)
        if doc["state"] in FINAL:
            channel, state = keys.task_done_channel(sid, task_id), doc["state"]
        events = finish_events(sid, doc)  # queued with the document, in the same step
        if events:
            script_keys.append(keys.webhooks(sid))
    fields = [] if outcomes is None else [x for kv in outcomes.fields().items() for x in kv]
    args: list[str | int] = [
        holder() if release else "",
        ctx.ledger.ttl_s,
        "0" if outcomes is None else "1",
        doc_json,
        ctx.documents.ttl_s,
        channel,
        state,
        events,
        *fields,
    ]
    # parking the job and releasing the lease are one atomic step: no moment when neither
    # holds the job (the watcher would publish it again)
    if schedule_at is not None and is_cluster(ctx.state):
        # on a Redis Cluster the schedule is in another hash slot: the job is parked first,
        # on its own (for a moment both hold it; the lease still keeps the send single)
        ctx.state.zadd(ctx.schedule.key, {encode_job(job): schedule_at})
        schedule_at = None
    pipe = ctx.state.pipeline(transaction=schedule_at is not None)
    run = script("attempt_finish", functions=("event_emit",))
    scripted = release or outcomes is not None or doc is not None
    if scripted:
        run.queue(pipe, script_keys, args)
    if schedule_at is not None:
        pipe.zadd(ctx.schedule.key, {encode_job(job): schedule_at})
    if transition is not None:
        pipe.hincrby(keys.stats(), transition, 1)
    if forget:
        pipe.zrem(keys.accepted(), encode_job(job))
        if job.get("attachments"):  # stored once, until the task is final
            pipe.delete(keys.attachments(sid, task_id))
    if then is not None:
        _begin_script().queue(pipe, then.keys, then.args)
    try:
        replies = pipe.execute(raise_on_error=False)
        ahead = replies.pop() if then is not None else None
        if scripted and isinstance(replies[0], NoScriptError):
            # Redis lost its scripts (a restart): the commands beside it ran (so they are
            # not repeated; for that moment the job may be out of the accepted set before
            # its document is final): load the script, run it
            replies[0] = run(ctx.state, script_keys, args)
    except (RedisConnectionError, RedisTimeoutError):
        if outcomes is not None:
            ctx.ledger.record(sid, task_id, outcomes.recipients, outcomes.response)
        raise
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
    return ahead


def _solution(raw: bytes | None) -> Solution | None:
    if raw is None:
        return None
    record = json.loads(raw)
    return Solution(record["solution_id"], record["created_at"], record["config"])
