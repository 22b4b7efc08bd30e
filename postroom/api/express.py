"""A send that passes every check, checked and queued in one round trip.

The intake's usual path reads what its checks need in one round trip (:mod:`postroom.api.admission`)
and queues the job in a second. Once an API process has seen a solution pass, it keeps a copy
of the solution's record. The next send for that solution is judged on the copy (sender,
relay), built from it, and handed to one script (``postroom/shared/lua/intake_send.lua``). The
script checks, in Redis and in one atomic step:

- the token is the solution's (or the admin's, judged here);
- the record is still the one the job was built from (its SHA-1);
- no recipient has a suppression entry;
- the bucket has a token for the message.

Only then does it write the task document, the accepted-set entry and the queued message.
Any other finding writes nothing, the copy is dropped, and the route takes its usual path,
which gives the answer it always gives. A stale copy costs a round trip, never a wrong verdict.

The one-step path needs the broker's queue, the accepted set and the task documents in one
Redis (the default: ``POSTROOM_BROKER_URL`` and ``POSTROOM_RESULT_BACKEND`` unset), and it is
not taken by a send with an ``Idempotency-Key``.

On RabbitMQ (with one Redis, or Sentinel, for state: not a cluster, where the script's
global keys would span slots) the script does the same checks and writes everything but the
queued message; the job is then published with its confirm. A job RabbitMQ does not
confirm is taken back (its document, accepted-set and task-list entries) and answered 503,
as on the usual path. This saves the usual path's second Redis round trip: about a fifth of
the API's CPU per send on RabbitMQ (``bench/bench_topologies.py``, ``docs/scaling.md``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from postroom.api import tasklist
from postroom.api.auth import bearer_token, is_admin
from postroom.shared import keys
from postroom.shared.crypto import hash_token
from postroom.shared.documents import DocumentStore
from postroom.shared.errors import ServiceUnavailable, Unauthorized
from postroom.shared.queue import Enqueuer, OneStep, unavailable
from postroom.shared.ratelimit import Decision, decision_of
from postroom.shared.redis_client import is_cluster
from postroom.shared.schemas.addresses import address_key
from postroom.shared.scripts import script
from postroom.shared.settings import Settings
from postroom.shared.solutions import Solution

log = logging.getLogger("postroom.api")

#: solutions whose record a process keeps (the oldest is dropped first)
MAX_KNOWN = 1024


class Express:
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
        results: redis.Redis,
        documents: DocumentStore,
        enqueuer: Enqueuer,
    ) -> Express | None:
        """The one-step path, or None when the job and its document live elsewhere."""
        one_step = enqueuer.one_step()
        if one_step is None or results is not state:
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

    def send(
        self,
        job: dict[str, Any],
        doc: dict[str, Any],
        recipients: Iterable[str],
        request_hlimit: int | None,
        solution: Solution,
    ) -> Decision | None:
        """Queue ``job`` (built from ``solution``) with its first document ``doc`` if every
        check passes in Redis; the bucket's answer, or None when nothing was written."""
        return self.send_many([(job, doc, recipients, request_hlimit)], solution)[0]

    def send_many(
        self,
        sends: Sequence[tuple[dict[str, Any], dict[str, Any], Iterable[str], int | None]],
        solution: Solution,
    ) -> list[Decision | None]:
        """:meth:`send` for each ``(job, doc, recipients, request_hlimit)`` of one solution,
        all in one round trip and one transaction (one script call each: every send is
        judged and queued on its own). When one finds something else, the copy of the
        record is dropped."""
        sid = solution.solution_id
        try:
            token = bearer_token()
        except Unauthorized:
            return [None] * len(sends)
        admin = is_admin(token, self._settings.admin_token)
        caller = keys.solution(sid) if admin else keys.token(hash_token(token))
        calls = [self._call(caller, admin, solution, *send) for send in sends]
        try:
            if len(calls) == 1:  # one script alone is atomic (and needs no pipeline)
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
        if self._one_step.publish is not None:
            self._publish(sends, replies, solution.solution_id)
        if any(reply is None for reply in replies):
            self._known.pop(sid, None)
        return [None if reply is None else decision_of(reply) for reply in replies]

    def _publish(
        self,
        sends: Sequence[tuple[dict[str, Any], dict[str, Any], Iterable[str], int | None]],
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
        sends: Sequence[tuple[dict[str, Any], dict[str, Any], Iterable[str], int | None]],
        sid: str,
    ) -> None:
        """Remove what the script wrote for ``sends``, whose publishing failed."""
        pipe = self._client.pipeline(transaction=False)
        for job, _, recipients, _ in sends:
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
        job: dict[str, Any],
        doc: dict[str, Any],
        recipients: Iterable[str],
        request_hlimit: int | None,
    ) -> tuple[list[str], list[str | int | float]]:
        """The keys and arguments of ``intake_send.lua`` for one send."""
        sid = solution.solution_id
        recipients = list(recipients)
        capacity = solution.config.get("hLimit")
        capacity = self._settings.hlimit_default if capacity is None else int(capacity)
        request = -1 if request_hlimit is None or request_hlimit >= capacity else request_hlimit
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
