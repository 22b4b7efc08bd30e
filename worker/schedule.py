"""Jobs due later — retries and deferred sends — kept in Redis, not in the broker.

A countdown longer than the Redis broker's visibility timeout would be redelivered again
and again, and an ETA message holds a worker's prefetch slot; so a job that must wait is
parked in a sorted set scored by its due time, and a small loop in every worker moves due
jobs back onto the queue. Moving is at-least-once: a due job is first pushed 30 s into the
future (a claim), then published, then removed; a mover that dies between the two leaves
it to come due again. A job published twice is harmless (the send ledger and the task's
lease make the second a no-op).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from shared import keys

log = logging.getLogger("postroom.worker.schedule")

CLAIM_S = 30.0

# KEYS[1] the schedule (sorted set: member = job JSON, score = due time in seconds)
# ARGV[1] now (seconds), ARGV[2] how many at most, ARGV[3] the claim's length in seconds
# Returns the due members, each re-scored to now + claim so no other mover takes it.
_CLAIM_DUE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local until_ts = tonumber(ARGV[1]) + tonumber(ARGV[3])
for _, member in ipairs(due) do
  redis.call('ZADD', KEYS[1], until_ts, member)
end
return due
"""


class Schedule:
    def __init__(self, client: redis.Redis) -> None:
        self._r = client
        self._claim = client.register_script(_CLAIM_DUE)

    def add(self, job: dict[str, Any], due_ts: float) -> None:
        self._r.zadd(keys.schedule(), {_encode(job): due_ts})

    def claim_due(self, now: float, limit: int = 100) -> list[tuple[str, dict[str, Any]]]:
        members = self._claim(keys=[keys.schedule()], args=[now, limit, CLAIM_S])
        return [(m.decode(), json.loads(m)) for m in members]

    def done(self, member: str) -> None:
        self._r.zrem(keys.schedule(), member)

    def size(self) -> int:
        return int(self._r.zcard(keys.schedule()))


def _encode(job: dict[str, Any]) -> str:
    return json.dumps(job, sort_keys=True, separators=(",", ":"))


class Mover:
    """A thread that publishes due jobs; one per worker process group (the main process)."""

    def __init__(
        self,
        schedule: Schedule,
        publish: Callable[[dict[str, Any]], None],
        interval_s: float = 0.2,
    ) -> None:
        self._schedule = schedule
        self._publish = publish
        self._interval_s = interval_s
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
        moved = 0
        for member, job in self._schedule.claim_due(time.time()):
            self._publish(job)
            self._schedule.done(member)
            moved += 1
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
