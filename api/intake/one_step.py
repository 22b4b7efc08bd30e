"""A send checked and queued in one round trip, for a solution this process has seen pass.

Once an API process has seen a solution pass its checks, it keeps a copy of the solution's
record. The next send for that solution is judged on the copy (sender, relay), built from
it, and handed to one script (``shared/lua/intake_send.lua``), which checks in Redis, in
one
atomic step:

- the token is the solution's (or the admin's, judged here);
- the record is still the one the job was built from (its SHA-1);
- no recipient has a suppression entry;
- the bucket has a token for the message.

Only then does it write the task document, the task-list entry, the accepted-set entry and
the queued message. Any other finding writes nothing, the copy is dropped, and the send
takes its checks apart (:mod:`postroom.api.intake.checks`), which give the answer they always give.
A stale copy costs a round trip, never a wrong verdict.

It needs the broker's queue, the accepted set and the task documents in one Redis (the
default: ``POSTROOM_BROKER_URL`` and ``POSTROOM_RESULT_BACKEND`` unset). On RabbitMQ (with one
Redis, or Sentinel, for state: not a cluster, where the script's global keys would span
slots) the script writes everything but the message, and the job is then published with its
confirm; a job RabbitMQ does not confirm is taken back (its document, accepted-set and
task-list entries) and answered 503.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from postroom.api import tasklist
from postroom.api.auth import bearer_token, is_admin
from postroom.shared import keys
from postroom.shared.crypto import hash_token
from postroom.shared.documents import DocumentStore, new_document
from postroom.shared.errors import ServiceUnavailable, Unauthorized
from postroom.shared.queue import Enqueuer, OneStep, unavailable
from postroom.shared.ratelimit import Decision, decision_of
from postroom.shared.records import Job
from postroom.shared.redis_client import is_cluster
from postroom.shared.schemas.addresses import address_key
from postroom.shared.scripts import script
from postroom.shared.settings import Settings
from postroom.shared.solutions import Solution, hlimit_of

log = logging.getLogger("postroom.api")

#: solutions whose record a process keeps (the oldest is dropped first)
MAX_KNOWN = 1024

#: one send for the script: its job, its recipients, the request's own hLimit
Send = tuple[Job, list[str], int | None]


class OneStepIntake:
    """The one-step send of one API process, with the records it has seen pass."""

    def __init__(
        self,
        client: redis.Redis,
        settings: Settings,
        documents: DocumentStore,
        one_step: OneStep,
    ) -> None:
        self._client = client
        self._settings = settings
        self._documents = documents
        self._one_step = one_step
        self._known: dict[str, Solution] = {}
        self._script = script("intake_send", functions=("bucket",))

    @classmethod
    def build(
        cls,
        settings: Settings,
        state: redis.Redis,
        one_redis: bool,
        documents: DocumentStore,
        enqueuer: Enqueuer,
    ) -> OneStepIntake | None:
        """The one-step path, or None when the job and its document live elsewhere
        (``one_redis``: the documents are in ``state``)."""
        one_step = enqueuer.one_step()
        if one_step is None or not one_redis:
            return None
        if one_step.publish is not None and is_cluster(state):
            return None  # the script's global keys (token, accepted set) span slots
        return cls(state, settings, documents, one_step)

    def known(self, sid: str) -> Solution | None:
        """The record of ``sid`` as last seen passing, if any."""
        return self._known.get(sid)

    def remember(self, solution: Solution) -> None:
        """Keep ``solution`` (read from Redis just now) for the next send."""
        sid = solution.solution_id
        if not solution.digest:
            return
        if sid not in self._known and len(self._known) >= MAX_KNOWN:
            oldest = next(iter(self._known), None)
            if oldest is not None:
                self._known.pop(oldest, None)  # another thread may have taken it
        self._known[sid] = solution

    def send_many(self, sends: Sequence[Send], solution: Solution) -> list[Decision | None]:
        """Queue each ``(job, recipients, request_hlimit)`` of one solution (its job built
        from ``solution``) with its first document, if every check passes in Redis: the
        bucket's answer, or None when nothing was written for it. All in one round trip and
        one transaction, one script call each (every send is judged and queued on its own).
        When one finds something else, the copy of the record is dropped."""
        sid = solution.solution_id
        try:
            token = bearer_token()
        except Unauthorized:
            return [None] * len(sends)
        admin = is_admin(token, self._settings.admin_token)
        caller = keys.solution(sid) if admin else keys.token(hash_token(token))
        calls = [self._call(caller, admin, solution, *send) for send in sends]
        try:
            # split kept (about 10 % on intake, docs/throughput.md): one script alone is
            # atomic and needs no transaction
            if len(calls) == 1:
                replies = [self._script(self._client, *calls[0])]
            else:  # all of them or none run: a lost connection leaves no batch half queued
                pipe = self._client.pipeline(transaction=True)
                for script_keys, args in calls:
                    self._script.queue(pipe, script_keys, args)
                replies = pipe.execute(raise_on_error=False)
            for n, reply in enumerate(replies):
                if isinstance(reply, NoScriptError):  # Redis restarted: that call ran not
                    replies[n] = self._script(self._client, *calls[n])
        except (RedisConnectionError, RedisTimeoutError):
            raise  # the store is away: the 503 every route gives then
        except RedisError as exc:
            raise unavailable(exc) from None
        for reply in replies:
            if isinstance(reply, RedisError):
                raise unavailable(reply)
        if self._one_step.publish is not None:  # split kept: RabbitMQ (docs/scaling.md)
            self._publish(sends, replies, solution.solution_id)
        if any(reply is None for reply in replies):
            self._known.pop(sid, None)
        return [None if reply is None else decision_of(reply) for reply in replies]

    def _publish(
        self,
        sends: Sequence[Send],
        replies: list[Any],
        sid: str,
    ) -> None:
        """On RabbitMQ, publish the jobs the script wrote, in order. When the broker fails
        one, it and those after it are taken back (document, accepted entry, task-list
        entry): 503 when none was published, else those answer None and take the usual
        path on their own (a batch keeps the answers of the jobs already published)."""
        publish = self._one_step.publish
        assert publish is not None
        written = [n for n, reply in enumerate(replies) if reply is not None]
        for position, n in enumerate(written):
            try:
                publish(sends[n][0])
            except ServiceUnavailable:
                self._take_back([sends[k] for k in written[position:]], sid)
                if position == 0:
                    raise
                for k in written[position:]:
                    replies[k] = None
                return

    def _take_back(
        self,
        sends: Sequence[Send],
        sid: str,
    ) -> None:
        """Remove what the script wrote for ``sends``, whose publishing failed."""
        pipe = self._client.pipeline(transaction=False)
        for job, recipients, _ in sends:
            member, _ = self._one_step.entry(job)
            pipe.delete(keys.task(sid, job["task_id"]))
            pipe.zrem(self._one_step.accepted.key, member)
            pipe.zrem(keys.task_index(sid), tasklist.entry(job["task_id"], recipients))
        try:
            pipe.execute()
        except RedisError:
            log.warning("could not take back jobs the broker refused")

    def _call(
        self,
        caller: str,
        admin: bool,
        solution: Solution,
        job: Job,
        recipients: list[str],
        request_hlimit: int | None,
    ) -> tuple[list[str], list[str | int | float]]:
        """The keys and arguments of ``intake_send.lua`` for one send."""
        sid = solution.solution_id
        doc = new_document(job["task_id"], sid, job["created_at"], job["metadata"])
        capacity = hlimit_of(solution.config, self._settings.hlimit_default)
        request = -1 if request_hlimit is None else request_hlimit
        member, due = self._one_step.entry(job)
        script_keys = [
            caller,
            keys.solution(sid),
            keys.suppressions(sid),
            keys.task(sid, job["task_id"]),
            self._one_step.accepted.key,
            self._one_step.queue,
            keys.bucket(sid),
            keys.task_index(sid),
        ]
        if request >= 0:
            script_keys.append(keys.request_bucket(sid, request))
        args: list[str | int | float] = [
            "" if admin else sid,
            solution.digest,
            repr(self._settings.hlimit_period_s),
            capacity,
            request,
            self._documents.encode(doc),
            self._documents.ttl_s,
            member,
            repr(due),
            self._one_step.message(job, member),
            tasklist.entry(job["task_id"], recipients),
            repr(job["created_at"]),
            repr(job["created_at"] - self._documents.ttl_s),
            *dict.fromkeys(address_key(r) for r in recipients),
        ]
        return script_keys, args
