"""Jobs due later — retries and deferred sends — kept in Redis, not in the broker; and the
watcher that puts back accepted jobs nothing holds any more.

A countdown longer than the Redis broker's visibility timeout would be redelivered again
and again, and an ETA message holds a worker's prefetch slot; so a job that must wait is
parked in a sorted set scored by its due time, and a small loop in every worker (the
*mover*, a thread of the worker's main process) moves due jobs back onto the queue.
Moving is at-least-once: a due job is first pushed 30 s into the future (a claim), then
published, then removed; a mover that dies between the two leaves it to come due again.
A job published twice is harmless (the send ledger and the task's lease make the second
a no-op).

The member is the job itself, so parking the same job twice keeps one entry (the later due
time). The removal after publishing is conditional — only while the entry still has the
claim's score — because the published job may already have run, failed again and parked
itself anew under the same member before the mover got to remove it.

The same loop runs the *watcher* over the accepted set
(:func:`postroom.shared.queue.accepted_jobs`):
a job accepted a redelivery window ago whose document is not final, which no worker holds
(no lease) and which is not parked here, was lost by the broker; it is published again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import redis

from postroom.shared import keys
from postroom.shared.documents import FINAL, DocumentStore
from postroom.shared.queue import Claimed, JobSet
from postroom.shared.records import Job
from postroom.worker.lease import Leases

log = logging.getLogger("postroom.worker.schedule")

CLAIM_S = 30.0

__all__ = ["CLAIM_S", "Claimed", "Mover", "Schedule", "Watcher"]

Publish = Callable[[Job], None]


class Schedule(JobSet):
    """Jobs parked until their due time (``keys.schedule()``)."""

    def __init__(self, client: redis.Redis) -> None:
        super().__init__(client, keys.schedule(), CLAIM_S)


class Watcher:
    """Publishes again the accepted jobs that nothing holds (see the module's docstring).

    ``doc_ttl_s`` is how long task documents live: a job whose document is missing is
    published again only while that cannot be because it expired (a job re-sent after its
    document and ledger are gone would be sent twice)."""

    def __init__(
        self,
        accepted: JobSet,
        schedule: Schedule,
        documents: DocumentStore,
        leases: Leases,
        publish: Publish,
        doc_ttl_s: float,
    ) -> None:
        self._accepted = accepted
        self._schedule = schedule
        self._documents = documents
        self._leases = leases
        self._publish = publish
        self._doc_ttl_s = doc_ttl_s

    def tick(self, now: float | None = None) -> int:
        """Look at the accepted jobs due for a check; returns how many were published."""
        now = time.time() if now is None else now
        published = 0
        for claimed in self._accepted.claim_due(now):
            if self._check(claimed, now):
                published += 1
        return published

    def _check(self, claimed: Claimed, now: float) -> bool:
        job = claimed.job
        sid, task_id = job["solution_id"], job["task_id"]
        doc = self._documents.get(sid, task_id)
        if doc is not None and doc["state"] in FINAL:
            self._accepted.done(claimed)
            return False
        age = now - float(job["created_at"])
        if doc is None and age >= self._doc_ttl_s - self._accepted.claim_s:
            self._accepted.done(claimed)  # its document may have expired: leave it
            return False
        if self._leases.held(sid, task_id) or self._schedule.due_at(job) is not None:
            return False  # a worker or the schedule holds it; look again a window later
        log.warning("an accepted job is held nowhere; publishing it again",
                    extra={"task_id": task_id, "solution_id": sid})
        self._publish(job)
        return True


class Mover:
    """A thread that publishes due jobs; one per worker process group (the main process)."""

    def __init__(
        self,
        schedule: Schedule,
        publish: Publish,
        interval_s: float = 0.2,
        watcher: Watcher | None = None,
    ) -> None:
        self._schedule = schedule
        self._publish = publish
        self._interval_s = interval_s
        self._watcher = watcher
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="postroom-mover", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def tick(self) -> int:
        """Publish every job due now (and the watcher's finds); returns how many."""
        moved = 0
        for claimed in self._schedule.claim_due(time.time()):
            self._publish(claimed.job)
            self._schedule.done(claimed)
            moved += 1
        if self._watcher is not None:
            moved += self._watcher.tick()
        return moved

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                moved = self.tick()
            except Exception:  # keep moving after a Redis or broker outage
                log.warning("scheduler tick failed; retrying", exc_info=True)
                moved = 0
            if not moved:
                self._stop.wait(self._interval_s)
