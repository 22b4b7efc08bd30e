"""The Redis side of a delivery attempt (``worker/attempt_store.py``,
``shared/lua/attempt_*.lua``,
the bucket's attempt mark): what each step reads and writes, on real Redis and fakeredis,
and whole attempts in process against a real SMTP server — sent in two round trips, the
lease and the accepted set left as the watcher expects, a relay's reply kept through a
Redis error."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any, cast

import fakeredis
import pytest
import redis
import redis.client
import redis.connection
from redis.exceptions import ConnectionError as RedisConnectionError

from postroom.shared import keys
from postroom.shared.documents import new_document
from postroom.shared.queue import accepted_jobs, encode_job
from postroom.shared.ratelimit import TokenBucket
from postroom.shared.records import Job, TaskDocument
from postroom.worker import attempt_store, tasks
from postroom.worker.batching import Item
from postroom.worker.lease import holder
from postroom.worker.ledger import LedgerState, Outcomes
from postroom.worker.resources import WorkerContext
from postroom.worker.sending import Attempt
from tests.helpers import as_bytes, make_settings
from tests.smtp_server import ScriptedSmtpServer

SID = "acme"
ACCEPTED = {"status": "accepted", "code": 250, "reply": None}


def make_job(n: int = 1, to: list[str] | None = None) -> Job:
    return {
        "task_id": f"task-{n}",
        "solution_id": SID,
        "created_at": time.time(),
        "message_id": f"<m{n}@postroom.test>",
        "hlimit": None,
        "relay": None,
        "message": {
            "from": "app@postroom.test",
            "to": to or ["a@example.com"],
            "cc": [],
            "bcc": [],
            "subject": "hello",
            "text": "hi",
            "html": None,
        },
        "metadata": {},
    }


def make_context(state: redis.Redis, results: redis.Redis | None = None,
                 smtp_port: int = 25, **overrides: Any) -> WorkerContext:  # fmt: skip
    settings = make_settings("redis://127.0.0.1:6379/7",
                             default_smtp_url=f"smtp+plain://127.0.0.1:{smtp_port}",
                             smtp_allow_hosts=("127.0.0.1",), **overrides)  # fmt: skip
    return WorkerContext(settings=settings, state=state, results=results or state)


def queued(ctx: WorkerContext, job: Job, hlimit: int = 100) -> None:
    """What intake leaves behind: the solution, the first document, the accepted entry."""
    if ctx.state.get(keys.solution(SID)) is None:
        ctx.solutions.create(SID, {"hLimit": hlimit})
    ctx.documents.put(new_document(job["task_id"], SID, job["created_at"]))
    accepted_jobs(ctx.state, ctx.settings).add(job, time.time() + 3600)


def ledger_of(client: redis.Redis, n: int = 1) -> dict[str, str]:
    raw = client.hgetall(keys.ledger(SID, f"task-{n}"))
    return {as_bytes(k).decode(): as_bytes(v).decode() for k, v in dict(raw).items()}


def document(client: redis.Redis, n: int = 1) -> dict[str, Any]:
    raw = client.get(keys.task(SID, f"task-{n}"))
    assert raw is not None
    doc: dict[str, Any] = json.loads(raw)
    return doc


@pytest.fixture
def trips(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Counts the Redis round trips (requests written) of every client of this process."""
    counter = [0]
    send = redis.connection.AbstractConnection.send_packed_command

    def counting(self: Any, command: Any, check_health: bool = True) -> None:
        counter[0] += 1
        send(self, command, check_health)

    monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", counting)
    yield counter


# -- begin --------------------------------------------------------------------------------


def test_begin_takes_the_lease_and_reads_document_ledger_and_solution(
    any_redis: redis.Redis,
) -> None:
    """A free lease becomes this process's for the attempt's length, and the same step
    reads the document, the ledger (attempts, recipients done) and the solution."""
    ctx = make_context(any_redis)
    job = make_job()
    queued(ctx, job, hlimit=7)
    any_redis.hset(keys.ledger(SID, "task-1"),
                   mapping={"attempts": 2, "rcpt:a@example.com": json.dumps(ACCEPTED)})  # fmt: skip

    begun = attempt_store.begin(ctx, SID, "task-1", 30.0)

    assert (True, "queued") == (begun.leased, begun.doc and begun.doc["state"])
    assert (2, {"a@example.com": ACCEPTED}) == (begun.ledger.attempts, begun.ledger.done)
    assert begun.solution is not None and 7 == begun.solution.hlimit(ctx.settings.hlimit_default)
    assert holder().encode() == any_redis.get(keys.lease(SID, "task-1"))
    assert 29_000 < any_redis.pttl(keys.lease(SID, "task-1")) <= 30_000


def test_begin_leaves_a_live_holder_alone_and_says_how_long_it_holds(
    any_redis: redis.Redis,
) -> None:
    """A lease held by another worker is not taken: the answer says for how long it still
    runs, and the ledger and solution are not read (``solution`` None, empty ledger)."""
    ctx = make_context(any_redis)
    queued(ctx, make_job())
    any_redis.set(keys.lease(SID, "task-1"), "elsewhere:1", px=5000)

    begun = attempt_store.begin(ctx, SID, "task-1", 30.0)

    assert (False, None, LedgerState()) == (begun.leased, begun.solution, begun.ledger)
    assert 4.0 < begun.lease_left_s <= 5.0
    assert b"elsewhere:1" == any_redis.get(keys.lease(SID, "task-1"))


def test_begin_takes_over_its_own_lease_and_that_of_a_dead_process_here(
    any_redis: redis.Redis,
) -> None:
    """A lease this process holds already (the attempt run again after a Redis error) and
    one held by a process of this host that is gone (a killed pool child) are taken."""
    ctx = make_context(any_redis)
    queued(ctx, make_job(1))
    queued(ctx, make_job(2))
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    host = holder().rpartition(":")[0]
    any_redis.set(keys.lease(SID, "task-1"), holder(), px=5000)
    any_redis.set(keys.lease(SID, "task-2"), f"{host}:{gone.pid}", px=5000)

    first = attempt_store.begin(ctx, SID, "task-1", 30.0)
    second = attempt_store.begin(ctx, SID, "task-2", 30.0)

    assert (True, True) == (first.leased, second.leased)
    assert holder().encode() == any_redis.get(keys.lease(SID, "task-2"))
    assert any_redis.pttl(keys.lease(SID, "task-2")) > 5000


def test_begin_with_a_result_backend_of_its_own(any_redis: redis.Redis) -> None:
    """With the documents in another Redis, the document is read there; a final one ends
    the step before the lease is touched."""
    results = fakeredis.FakeRedis()
    ctx = make_context(any_redis, results)
    job = make_job()
    queued(ctx, job)
    assert None is any_redis.get(keys.task(SID, "task-1"))

    begun = attempt_store.begin(ctx, SID, "task-1", 30.0)
    assert (True, "queued") == (begun.leased, begun.doc and begun.doc["state"])

    any_redis.delete(keys.lease(SID, "task-1"))
    ctx.documents.put({**new_document("task-1", SID, 0.0), "state": "sent"})
    final = attempt_store.begin(ctx, SID, "task-1", 30.0)
    assert (False, "sent") == (final.leased, final.doc and final.doc["state"])
    assert 0 == any_redis.exists(keys.lease(SID, "task-1"))


def first_take(ctx: WorkerContext, request_capacity: int | None = None) -> attempt_store.FirstTake:
    return attempt_store.FirstTake(ctx.settings.hlimit_period_s, request_capacity, ctx.ledger.ttl_s,
                           ctx.settings.hlimit_default)


def test_begin_takes_the_token_of_a_first_attempt(any_redis: redis.Redis) -> None:
    """Asked to, begin takes the token of a message as the intake left it, and marks
    attempt 1 in its ledger, as ``TokenBucket.take`` would: from the solution's bucket and
    from the request's when it is tighter. Begun again, it takes nothing more."""
    ctx = make_context(any_redis)
    queued(ctx, {**make_job(), "hlimit": 5}, hlimit=50)

    begun = attempt_store.begin(ctx, SID, "task-1", 30.0, first_take(ctx, 5))

    assert begun.take is not None
    assert (True, 5, 4) == (begun.take.allowed, begun.take.limit, begun.take.remaining)
    assert {"token": "1", "sending": "1", "attempts": "1"} == ledger_of(any_redis)
    assert 0 < any_redis.ttl(keys.ledger(SID, "task-1")) <= ctx.ledger.ttl_s
    bucket = TokenBucket(any_redis, ctx.settings.hlimit_period_s)
    assert (49, 4) == (bucket.peek(SID, 50).remaining, bucket.peek(SID, 50, 5).remaining)
    assert None is attempt_store.begin(ctx, SID, "task-1", 30.0, first_take(ctx, 5)).take
    assert 49 == bucket.peek(SID, 50).remaining


def test_begin_takes_no_token_but_a_first_attempts(any_redis: redis.Redis) -> None:
    """No first take for a later attempt (its ledger or its document says so), a final
    document, a solution deleted, or when not asked; a refused one writes no ledger."""
    ctx = make_context(any_redis)
    bucket = TokenBucket(any_redis, ctx.settings.hlimit_period_s)
    for n in range(1, 6):
        queued(ctx, make_job(n), hlimit=50)
    any_redis.hset(keys.ledger(SID, "task-1"), "attempts", 1)
    ctx.documents.put({**new_document("task-2", SID, 0.0), "attempts": 1})
    ctx.documents.put({**new_document("task-3", SID, 0.0), "state": "sent"})
    assert None is attempt_store.begin(ctx, SID, "task-4", 30.0).take
    for n in (1, 2, 3):
        assert None is attempt_store.begin(ctx, SID, f"task-{n}", 30.0, first_take(ctx)).take
    ctx.solutions.delete(SID)
    assert None is attempt_store.begin(ctx, SID, "task-5", 30.0, first_take(ctx)).take
    assert 50 == bucket.peek(SID, 50).remaining

    queued(ctx, make_job(6), hlimit=0)
    refused = attempt_store.begin(ctx, SID, "task-6", 30.0, first_take(ctx))
    assert refused.take is not None and not refused.take.allowed
    assert {} == ledger_of(any_redis, 6)


# -- the take marks the attempt -----------------------------------------------------------


def test_an_allowed_take_marks_the_attempt_and_a_refused_one_marks_nothing(
    any_redis: redis.Redis,
) -> None:
    """With ``attempt`` N, a take that is allowed sets ``sending`` and ``attempts`` to N
    (and the ledger's time to live) with the token; a message that paid before is marked
    again at its next attempt; a refused take writes nothing to its ledger."""
    bucket = TokenBucket(any_redis, 3600)
    one, two = keys.ledger(SID, "task-1"), keys.ledger(SID, "task-2")

    first = bucket.take(SID, 1, once_key=one, attempt=1, ledger_ttl_s=600)
    assert {"token": "1", "sending": "1", "attempts": "1"} == ledger_of(any_redis, 1)
    assert 0 < any_redis.ttl(one) <= 600

    refused = bucket.take(SID, 1, once_key=two, attempt=1, ledger_ttl_s=600)
    again = bucket.take(SID, 1, once_key=one, attempt=2, ledger_ttl_s=600)

    assert (True, False, True) == (first.allowed, refused.allowed, again.allowed)
    assert 0 == any_redis.exists(two)
    assert {"token": "1", "sending": "2", "attempts": "2"} == ledger_of(any_redis, 1)
    with pytest.raises(ValueError):
        bucket.take(SID, 1, attempt=1)


# -- finish -------------------------------------------------------------------------------


def test_finish_records_writes_releases_and_takes_the_job_out_of_the_accepted_set(
    any_redis: redis.Redis,
) -> None:
    """A final document: the outcomes and reply go to the ledger (``sending`` ends), the
    document is written and announced, the lease released, the counter counted and the
    job taken out of the accepted set — and the ledger reads as the state built locally."""
    ctx = make_context(any_redis)
    job = make_job()
    queued(ctx, job)
    any_redis.hset(keys.ledger(SID, "task-1"), mapping={"sending": 1, "attempts": 1})
    begun = attempt_store.begin(ctx, SID, "task-1", 30.0)
    pubsub = any_redis.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(keys.task_done_channel(SID, "task-1"))
    outcomes = Outcomes({"a@example.com": ACCEPTED}, "250 ok")
    assert begun.doc is not None
    doc: TaskDocument = {**begun.doc, "state": "sent", "attempts": 1}

    attempt_store.finish(ctx, job, doc=doc, transition="sent", outcomes=outcomes, release=True,
                 forget=True)  # fmt: skip

    expected = LedgerState(done={"a@example.com": ACCEPTED}, response="250 ok", attempts=1)
    assert expected == ctx.ledger.load(SID, "task-1") == begun.ledger.after(outcomes)
    assert ("sent", 1) == (document(any_redis)["state"], document(any_redis)["attempts"])
    assert 0 < any_redis.ttl(keys.task(SID, "task-1")) <= ctx.settings.result_ttl
    assert 0 < any_redis.ttl(keys.ledger(SID, "task-1")) <= ctx.settings.result_ttl
    assert 0 == any_redis.exists(keys.lease(SID, "task-1"))
    assert None is any_redis.zscore(keys.accepted(), encode_job(job))
    assert b"1" == any_redis.hget(keys.stats(), "sent")
    # the subscription's own confirmation reads as None: look until the announcement
    deadline, message = time.monotonic() + 2.0, None
    while message is None and time.monotonic() < deadline:
        message = pubsub.get_message(timeout=0.5)
    pubsub.close()
    assert message is not None and b"sent" == message["data"]


def test_finish_parks_the_job_and_leaves_anothers_lease_alone(any_redis: redis.Redis) -> None:
    """A job to retry is parked in the schedule (still in the accepted set); a lease that
    another worker holds by now is not released by a finish that names this one."""
    ctx = make_context(any_redis)
    job = make_job()
    queued(ctx, job)
    any_redis.set(keys.lease(SID, "task-1"), "elsewhere:1", px=5000)
    doc: TaskDocument = {**new_document("task-1", SID, job["created_at"]), "state": "retrying"}

    attempt_store.finish(ctx, job, doc=doc, transition="retrying", release=True, schedule_at=1234.5)

    assert 1234.5 == ctx.schedule.due_at(job)
    assert any_redis.zscore(keys.accepted(), encode_job(job)) is not None
    assert b"elsewhere:1" == any_redis.get(keys.lease(SID, "task-1"))
    assert "retrying" == document(any_redis)["state"]


def test_finish_loads_a_script_redis_forgot(fake_redis: redis.Redis) -> None:
    """After a restart Redis has no scripts: the finish script is loaded and run, and the
    commands beside it are not run twice."""
    ctx = make_context(fake_redis)
    job = make_job()
    queued(ctx, job)
    fake_redis.script_flush()
    doc: TaskDocument = {**new_document("task-1", SID, job["created_at"]), "state": "sent"}

    attempt_store.finish(ctx, job, doc=doc, transition="sent",
                 outcomes=Outcomes({"a@example.com": ACCEPTED}), forget=True)  # fmt: skip

    assert "sent" == document(fake_redis)["state"]
    assert json.dumps(ACCEPTED) == ledger_of(fake_redis)["rcpt:a@example.com"]
    assert b"1" == fake_redis.hget(keys.stats(), "sent")


# -- whole attempts ---------------------------------------------------------------------


def test_a_message_sent_at_its_first_try_costs_two_round_trips(
    real_redis: redis.Redis, smtp_server: ScriptedSmtpServer, trips: list[int]
) -> None:
    """begin (with the token), finish: two requests to Redis for a message sent at once; afterwards
    the document is ``sent``, the ledger says so, no lease is left and the job is out of
    the accepted set."""
    ctx = make_context(real_redis, smtp_port=smtp_server.port)
    job = make_job(to=["a@example.com", "b@example.com"])
    queued(ctx, job)
    real_redis.ping()  # the pool's connection is open before counting

    trips[0] = 0
    Attempt(ctx, job).run()
    assert 2 == trips[0]

    doc = document(real_redis)
    assert ("sent", 1, ["a@example.com", "b@example.com"]) == (
        doc["state"], doc["attempts"], doc["result"]["accepted"])
    assert {"attempts", "token", "response", "rcpt:a@example.com", "rcpt:b@example.com"} == set(
        ledger_of(real_redis))
    assert 0 == real_redis.exists(keys.lease(SID, "task-1"))
    assert None is real_redis.zscore(keys.accepted(), encode_job(job))
    assert [job["message_id"]] == [m.message_id for m in smtp_server.messages]
    ctx.pool.close_all()


def test_a_recipient_suppressed_after_intake_is_not_sent_to(
    real_redis: redis.Redis, smtp_server: ScriptedSmtpServer, trips: list[int]
) -> None:
    """The attempt's first step reads the recipients' suppression entries: a message whose
    only recipient was suppressed since intake fails ``Blocked`` with nothing sent and no
    token taken (in the same two round trips); not a bounce."""
    ctx = make_context(real_redis, smtp_port=smtp_server.port)
    job = make_job(to=["Ann@example.com"])
    queued(ctx, job, hlimit=50)
    ctx.suppressions.put(SID, "ann@example.com", "complaint")
    real_redis.ping()

    trips[0] = 0
    Attempt(ctx, job).run()
    assert 2 == trips[0]

    doc = document(real_redis)
    assert ("failed", "Blocked", ["Ann@example.com"]) == (
        doc["state"], doc["error"]["type"], doc["error"]["blocked"])
    assert ["Ann@example.com"] == doc["result"]["rejected"]
    assert [] == smtp_server.messages
    assert 50 == TokenBucket(real_redis, ctx.settings.hlimit_period_s).peek(SID, 50).remaining
    assert 0 == ctx.suppressions.bounce_count(SID, "ann@example.com")
    ctx.pool.close_all()


def test_the_other_recipients_are_sent_to_and_an_expired_entry_blocks_nothing(
    real_redis: redis.Redis, smtp_server: ScriptedSmtpServer
) -> None:
    ctx = make_context(real_redis, smtp_port=smtp_server.port)
    job = make_job(to=["a@example.com", "b@example.com", "c@example.com"])
    queued(ctx, job, hlimit=50)
    ctx.suppressions.put(SID, "b@example.com", "manual")
    ctx.suppressions.put(SID, "c@example.com", "manual", expires_at=time.time() - 1)

    Attempt(ctx, job).run()

    doc = document(real_redis)
    result = doc["result"]
    assert ("sent", ["a@example.com", "c@example.com"], ["b@example.com"]) == (
        doc["state"], result["accepted"], result["rejected"])
    [received] = smtp_server.messages
    assert ["a@example.com", "c@example.com"] == received.rcpt_tos
    assert 49 == TokenBucket(real_redis, ctx.settings.hlimit_period_s).peek(SID, 50).remaining
    ctx.pool.close_all()


def test_a_relay_the_guard_refuses_takes_no_token(real_redis: redis.Redis) -> None:
    """The relay is judged before the first attempt's begin: one refused fails the message
    (InvalidRelay) with no token taken and no attempt marked."""
    ctx = make_context(real_redis)
    job: Job = {**make_job(), "relay": {"host": "10.1.2.3", "port": 25, "scheme": "smtp",
                                        "user": None, "password": None}}  # fmt: skip
    queued(ctx, job, hlimit=50)

    Attempt(ctx, job).run()

    doc = document(real_redis)
    assert ("failed", "InvalidRelay") == (doc["state"], doc["error"]["type"])
    assert 50 == TokenBucket(real_redis, ctx.settings.hlimit_period_s).peek(SID, 50).remaining
    assert "sending" not in ledger_of(real_redis) and "token" not in ledger_of(real_redis)


def test_a_result_backend_of_its_own_gets_the_document(
    real_redis: redis.Redis, smtp_server: ScriptedSmtpServer
) -> None:
    """With the documents in another Redis, the attempt writes the ledger, the lease and
    the accepted set in the state's Redis and the final document in the other."""
    results = fakeredis.FakeRedis()
    ctx = make_context(real_redis, results, smtp_port=smtp_server.port)
    job = make_job()
    queued(ctx, job)

    Attempt(ctx, job).run()

    assert "sent" == document(results)["state"]
    assert 0 == real_redis.exists(keys.task(SID, "task-1"), keys.lease(SID, "task-1"))
    assert "rcpt:a@example.com" in ledger_of(real_redis)
    assert None is real_redis.zscore(keys.accepted(), encode_job(job))
    ctx.pool.close_all()


def test_rejections_count_as_bounces_and_a_deferred_recipient_is_parked(
    any_redis: redis.Redis, smtp_server: ScriptedSmtpServer
) -> None:
    """550 to one recipient and 451 to another: the first is rejected in the ledger and
    counted as a bounce, the second stays pending; the job waits in the schedule, the
    document says ``retrying`` and the lease is free for the next attempt."""
    smtp_server.script.rcpt_replies = {"bad@example.com": "550 5.1.1 no such user",
                                       "slow@example.com": "451 4.2.1 try again later"}
    ctx = make_context(any_redis, smtp_port=smtp_server.port)
    job = make_job(to=["a@example.com", "bad@example.com", "slow@example.com"])
    queued(ctx, job)

    Attempt(ctx, job).run()

    doc = document(any_redis)
    assert ("retrying", ["slow@example.com"]) == (doc["state"], doc["pending"])
    assert ["bad@example.com"] == doc["result"]["rejected"]
    assert 1 == ctx.suppressions.bounce_count(SID, "bad@example.com")
    assert ctx.schedule.due_at(job) is not None
    assert 0 == any_redis.exists(keys.lease(SID, "task-1"))
    assert "sending" not in ledger_of(any_redis)
    ctx.pool.close_all()


def test_a_reply_is_kept_through_a_redis_error_and_the_message_sent_once(
    real_redis: redis.Redis, smtp_server: ScriptedSmtpServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last step meets a Redis error after the relay accepted the message: the reply is
    written to the ledger on its own and the error raised (the task waits and runs the
    attempt again); the run again finishes from the ledger without sending again."""
    ctx = make_context(real_redis, smtp_port=smtp_server.port)
    job = make_job()
    queued(ctx, job)
    execute = redis.client.Pipeline.execute
    failures = [1]

    def flaky(self: Any, raise_on_error: bool = True) -> Any:
        if not raise_on_error and failures and failures.pop():
            raise RedisConnectionError("connection lost")
        return execute(self, raise_on_error)

    monkeypatch.setattr(redis.client.Pipeline, "execute", flaky)
    attempt = Attempt(ctx, job)
    with pytest.raises(RedisConnectionError):
        attempt.run()
    assert json.dumps(ACCEPTED) == ledger_of(real_redis)["rcpt:a@example.com"]
    assert "queued" == document(real_redis)["state"]

    attempt.run()

    doc = document(real_redis)
    assert ("sent", 1) == (doc["state"], doc["attempts"])
    assert [job["message_id"]] == [m.message_id for m in smtp_server.messages]
    ctx.pool.close_all()


# -- a batch: each message's first step rides with the previous one's last -------------


def batch_of(ctx: WorkerContext, count: int) -> list[Item]:
    jobs = [make_job(n) for n in range(1, count + 1)]
    for job in jobs:
        queued(ctx, job)
    return [Item(cast(Job, dict(job)), time.time()) for job in jobs]


def run_batch(ctx: WorkerContext, items: list[Item]) -> list[bool]:
    return tasks.run_batch_with(lambda: ctx, ctx.settings, items)


def received(server: ScriptedSmtpServer) -> list[str | None]:
    """The Message-IDs the relay took, in order."""
    return [m.message_id for m in server.messages]


def tokens_left(client: redis.Redis) -> int:
    return TokenBucket(client, 3600).peek(SID, 100).remaining


def test_a_batch_costs_one_round_trip_per_message_and_one_more(
    real_redis: redis.Redis, smtp_server: ScriptedSmtpServer, trips: list[int]
) -> None:
    """Three messages, four requests to Redis (not six): the first begin, then each finish
    carrying the next begin. Every message ends ``sent`` once, at its first attempt, with
    its token taken once and no lease left."""
    ctx = make_context(real_redis, smtp_port=smtp_server.port)
    items = batch_of(ctx, 3)
    real_redis.ping()

    trips[0] = 0
    assert [True, True, True] == run_batch(ctx, items)
    assert 4 == trips[0]

    for n in (1, 2, 3):
        doc = document(real_redis, n)
        assert ("sent", 1) == (doc["state"], doc["attempts"]), n
        assert "sending" not in ledger_of(real_redis, n)
        assert 0 == real_redis.exists(keys.lease(SID, f"task-{n}"))
    assert [f"<m{n}@postroom.test>" for n in (1, 2, 3)] == received(smtp_server)
    assert 97 == tokens_left(real_redis)
    ctx.pool.close_all()


def test_a_message_begun_ahead_but_not_started_gives_its_lease_back(
    real_redis: redis.Redis, smtp_server: ScriptedSmtpServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The next message was begun with the first one's last step, then the worker began
    to stop: it goes back to the queue with its lease freed at once, and when it runs
    again it is sent once, on the token it took then."""
    ctx = make_context(real_redis, smtp_port=smtp_server.port)
    items = batch_of(ctx, 2)
    answers = iter([True, True, False])  # item 1; item 2 as the next; item 2 at its turn
    monkeypatch.setattr(tasks, "_may_start", lambda item, settings: next(answers))

    assert [True, False] == run_batch(ctx, items)

    assert 0 == real_redis.exists(keys.lease(SID, "task-2"))
    assert ["<m1@postroom.test>"] == received(smtp_server)
    assert "1" == ledger_of(real_redis, 2)["sending"]  # its token is taken, once

    monkeypatch.setattr(tasks, "_may_start", lambda item, settings: True)
    assert [True] == run_batch(ctx, items[1:])
    assert "sent" == document(real_redis, 2)["state"]
    assert ["<m1@postroom.test>", "<m2@postroom.test>"] == received(smtp_server)
    assert 98 == tokens_left(real_redis)
    ctx.pool.close_all()


def test_a_message_that_may_not_start_is_not_begun_ahead(
    real_redis: redis.Redis, smtp_server: ScriptedSmtpServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The next message's window no longer fits when the first one ends (or the worker
    stops): it is not begun with that step, takes no lease and no token, and goes back to
    the queue."""
    ctx = make_context(real_redis, smtp_port=smtp_server.port)
    items = batch_of(ctx, 2)

    def may_start(item: Item, settings: Any) -> bool:  # the second, only before the first
        return item is items[0] or not smtp_server.messages  # was sent: judged at its end

    monkeypatch.setattr(tasks, "_may_start", may_start)
    assert [True, False] == run_batch(ctx, items)

    assert {} == ledger_of(real_redis, 2)
    assert 0 == real_redis.exists(keys.lease(SID, "task-2"))
    assert 99 == tokens_left(real_redis)
    ctx.pool.close_all()


def test_a_begin_ahead_that_redis_refuses_is_made_again_on_its_own(
    real_redis: redis.Redis, smtp_server: ScriptedSmtpServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis forgot its scripts (a restart) just before the first message's last step:
    that step loads its script again, the next message's begin is made on its own, and
    both are sent once."""
    ctx = make_context(real_redis, smtp_port=smtp_server.port)
    items = batch_of(ctx, 2)
    begin_call = Attempt.begin_call
    flushed: list[bool] = []

    def forgetting(self: Attempt) -> Any:
        if not flushed:
            real_redis.script_flush()
            flushed.append(True)
        return begin_call(self)

    monkeypatch.setattr(Attempt, "begin_call", forgetting)
    assert [True, True] == run_batch(ctx, items)
    assert [("sent", 1), ("sent", 1)] == [
        (document(real_redis, n)["state"], document(real_redis, n)["attempts"]) for n in (1, 2)
    ]
    assert 2 == len(smtp_server.messages)
    ctx.pool.close_all()


def test_a_lost_reply_to_the_shared_round_trip_sends_nothing_twice(
    real_redis: redis.Redis, smtp_server: ScriptedSmtpServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis ran the first message's last step and the next one's begin, but the reply was
    lost: the first attempt runs again and finds its message sent; the next one begins
    again (its own lease, its token already taken) and is sent once."""
    ctx = make_context(real_redis, smtp_port=smtp_server.port)
    items = batch_of(ctx, 2)
    execute = redis.client.Pipeline.execute
    lost = [1]

    def losing(self: Any, raise_on_error: bool = True) -> Any:
        shared = [args[0] for args, _ in self.command_stack].count("EVALSHA") == 2
        replies = execute(self, raise_on_error)
        if shared and lost:  # a finish with the next begin: both ran, the reply is lost
            lost.pop()
            raise RedisConnectionError("connection lost")
        return replies

    monkeypatch.setattr(redis.client.Pipeline, "execute", losing)
    assert [True, True] == run_batch(ctx, items)

    assert not lost
    assert ["sent", "sent"] == [document(real_redis, n)["state"] for n in (1, 2)]
    assert ["<m1@postroom.test>", "<m2@postroom.test>"] == received(smtp_server)
    assert 98 == tokens_left(real_redis)
    assert 0 == real_redis.exists(keys.lease(SID, "task-2"))
    ctx.pool.close_all()
