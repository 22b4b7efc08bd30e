"""The schedule (jobs due later, in a Redis sorted set), the mover that puts due jobs back
on the queue, and the watcher that publishes again accepted jobs the broker lost — on real
Redis and on fakeredis."""

from __future__ import annotations

import time
from typing import cast

import pytest
import redis

from postroom.dev.embedded_redis import free_port
from postroom.shared import keys
from postroom.shared.documents import DocumentStore, new_document
from postroom.shared.errors import ServiceUnavailable
from postroom.shared.queue import JobSet, accepted_jobs, make_enqueuer
from postroom.shared.records import Job
from postroom.shared.settings import Settings
from postroom.worker import attempt_store as steps
from postroom.worker.lease import Leases
from postroom.worker.resources import WorkerContext
from postroom.worker.schedule import CLAIM_S, Mover, Schedule, Watcher


def job(n: int) -> Job:
    """A job as far as the schedule looks at one."""
    return cast(Job, {"task_id": f"t{n}", "solution_id": "acme",
                      "message": {"to": [f"u{n}@x.org"]}})


def test_only_due_jobs_are_claimed(any_redis: redis.Redis) -> None:
    """A claim at time T returns the jobs due at or before T, in due order, and no other."""
    schedule = Schedule(any_redis)
    schedule.add(job(1), 100.0)
    schedule.add(job(2), 50.0)
    schedule.add(job(3), 200.0)
    assert [job(2), job(1)] == [c.job for c in schedule.claim_due(now=100.0)]


def test_a_claimed_job_is_not_claimed_again_until_the_claim_runs_out(
    any_redis: redis.Redis,
) -> None:
    """A claimed job is pushed CLAIM_S into the future: a second mover does not take it
    meanwhile, and it comes due again if its mover never finishes."""
    schedule = Schedule(any_redis)
    schedule.add(job(1), 100.0)
    [claimed] = schedule.claim_due(now=100.0)
    assert [] == schedule.claim_due(now=100.0 + CLAIM_S - 1)
    assert [job(1)] == [c.job for c in schedule.claim_due(now=100.0 + CLAIM_S)]
    assert 100.0 + CLAIM_S == float(claimed.score)


def test_done_removes_a_published_job(any_redis: redis.Redis) -> None:
    """After publishing, the mover's ``done`` takes the job out of the schedule."""
    schedule = Schedule(any_redis)
    schedule.add(job(1), 100.0)
    [claimed] = schedule.claim_due(now=100.0)
    assert schedule.done(claimed)
    assert (0, None) == (schedule.size(), schedule.due_at(job(1)))


def test_a_job_parked_again_after_its_claim_is_kept(any_redis: redis.Redis) -> None:
    """The published job ran, failed again and parked itself (same member, new due time)
    before the mover removed it: the removal leaves the new entry alone."""
    schedule = Schedule(any_redis)
    schedule.add(job(1), 100.0)
    [claimed] = schedule.claim_due(now=100.0)
    schedule.add(job(1), 160.0)
    assert not schedule.done(claimed)
    assert 160.0 == schedule.due_at(job(1))


def test_parking_the_same_job_twice_keeps_one_entry(any_redis: redis.Redis) -> None:
    """The member is the job itself: parking it again moves its due time, no duplicate."""
    schedule = Schedule(any_redis)
    schedule.add(job(1), 100.0)
    schedule.add(job(1), 300.0)
    assert (1, 300.0) == (schedule.size(), schedule.due_at(job(1)))


def test_the_mover_publishes_due_jobs_and_removes_them(any_redis: redis.Redis) -> None:
    """One tick publishes every due job once and empties the schedule of them; jobs not
    yet due stay."""
    schedule = Schedule(any_redis)
    published: list[Job] = []
    now = time.time()
    schedule.add(job(1), now - 1)
    schedule.add(job(2), now - 2)
    schedule.add(job(3), now + 3600)
    assert 2 == Mover(schedule, published.append).tick()
    assert [job(2), job(1)] == published
    assert (1, now + 3600) == (schedule.size(), schedule.due_at(job(3)))


def test_a_failed_publish_leaves_the_job_to_come_due_again(any_redis: redis.Redis) -> None:
    """The broker refuses a publish: the error propagates (the mover's loop logs it and
    tries again later) and the job stays in the schedule, claimed, so it is not lost."""
    schedule = Schedule(any_redis)
    schedule.add(job(1), time.time() - 1)

    def broker_down(_: Job) -> None:
        raise ConnectionError("broker down")

    with pytest.raises(ConnectionError):
        Mover(schedule, broker_down).tick()
    due = schedule.due_at(job(1))
    assert due is not None and due > time.time() + CLAIM_S - 5


def test_the_mover_thread_moves_jobs_until_stopped(any_redis: redis.Redis) -> None:
    """Started, the mover publishes a job as soon as it comes due; stopped, it ends."""
    schedule = Schedule(any_redis)
    published: list[Job] = []
    mover = Mover(schedule, published.append, interval_s=0.01)
    mover.start()
    try:
        schedule.add(job(1), time.time() + 0.1)
        deadline = time.monotonic() + 10
        while not published and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        mover.stop()
    assert [job(1)] == published
    assert 0 == schedule.size()


# -- the watcher: accepted jobs the broker lost -----------------------------------------------

WINDOW = 60.0


class Published(list[Job]):
    def __call__(self, job: Job) -> None:
        self.append(job)


def watcher_for(client: redis.Redis, published: Published,
                doc_ttl_s: float = 7 * 86400) -> tuple[Watcher, JobSet]:
    accepted = JobSet(client, keys.accepted(), WINDOW)
    watcher = Watcher(accepted, Schedule(client), DocumentStore(client, 3600), Leases(client),
                      published, doc_ttl_s)
    return watcher, accepted


def accepted_job(client: redis.Redis, n: int, state: str | None = "queued",
                 created_at: float = 1000.0) -> Job:
    """A job accepted at ``created_at`` (checked a window later), with its document."""
    j = cast(Job, {**job(n), "created_at": created_at})
    JobSet(client, keys.accepted(), WINDOW).add(j, created_at + WINDOW)
    if state is not None:
        doc = new_document(j["task_id"], "acme", created_at)
        doc["state"] = state
        DocumentStore(client, 3600).put(doc)
    return j


def test_an_accepted_job_held_nowhere_is_published_again(any_redis: redis.Redis) -> None:
    """Queued a whole window ago, not leased, not scheduled: the broker lost it, so it is
    published again — once per window, not on every tick."""
    published = Published()
    watcher, _ = watcher_for(any_redis, published)
    lost = accepted_job(any_redis, 1)
    assert 0 == watcher.tick(now=1000.0 + WINDOW - 1)
    assert 1 == watcher.tick(now=1000.0 + WINDOW)
    assert 0 == watcher.tick(now=1000.0 + WINDOW + 1)
    assert [lost] == published


def test_a_final_job_leaves_the_accepted_set(any_redis: redis.Redis) -> None:
    """A job whose document is final is not published; it is taken out of the set."""
    published = Published()
    watcher, accepted = watcher_for(any_redis, published)
    accepted_job(any_redis, 1, state="sent")
    assert (0, 0) == (watcher.tick(now=1000.0 + WINDOW), accepted.size())
    assert [] == published


def test_a_leased_or_scheduled_job_is_left_alone(any_redis: redis.Redis) -> None:
    """A job a worker holds (its lease) or the schedule holds (a retry) is not published;
    it stays accepted, to be looked at a window later."""
    published = Published()
    watcher, accepted = watcher_for(any_redis, published)
    leased = accepted_job(any_redis, 1)
    parked = accepted_job(any_redis, 2, state="retrying")
    ctx = WorkerContext(settings=Settings(), state=any_redis, results=any_redis)
    assert steps.begin(ctx, "acme", leased["task_id"], 600).leased  # as a worker takes it
    Schedule(any_redis).add(parked, 5000.0)
    assert 0 == watcher.tick(now=1000.0 + WINDOW)
    assert ([], 2) == (published, accepted.size())


def test_a_job_without_a_document_is_published_only_while_young(any_redis: redis.Redis) -> None:
    """A missing document was lost with the result backend — unless the job is as old as
    documents live: then it may have expired, and the job is dropped rather than risk a
    second send."""
    published = Published()
    watcher, accepted = watcher_for(any_redis, published, doc_ttl_s=3600)
    young = accepted_job(any_redis, 1, state=None, created_at=5000.0)
    accepted_job(any_redis, 2, state=None, created_at=1000.0)
    assert 1 == watcher.tick(now=5000.0 + WINDOW)
    assert [young] == published
    assert None is accepted.due_at({**job(2), "created_at": 1000.0})


def test_the_enqueuer_records_accepted_jobs_and_withdraws_refused_ones(
    real_redis: redis.Redis, redis_url: str
) -> None:
    """A published job is in the accepted set (due a window later); one the broker refuses
    (503) is not, so the watcher never sends a job the client was told was not accepted."""
    settings = Settings(redis_url=redis_url, visibility_timeout_s=60)
    enqueuer = make_enqueuer(settings, real_redis)
    taken = cast(Job, {**job(1), "created_at": time.time()})
    enqueuer.enqueue(taken)
    due = accepted_jobs(real_redis, settings).due_at(taken)
    assert due is not None and time.time() + 50 < due <= time.time() + 60

    down = settings.replace(broker_url=f"redis://127.0.0.1:{free_port()}/0")
    refused = cast(Job, {**job(2), "created_at": time.time()})
    with pytest.raises(ServiceUnavailable):
        make_enqueuer(down, real_redis).enqueue(refused)
    assert None is accepted_jobs(real_redis, settings).due_at(refused)
