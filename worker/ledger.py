"""The send ledger: what has happened to one message at the SMTP level.

It is what makes at-least-once delivery from the broker exactly-once on the wire: a
redelivered job reads which recipients are done and sends only to the others; a job
whose every recipient is done finishes from the ledger without talking SMTP again.

Fields of the hash ``keys.ledger(sid, task_id)``:
``token`` (set by the bucket script when the message took its hLimit token),
``token_due``/``token_at`` (a slot held in the hLimit line under ``defer``: when it
comes and when it was taken, in Redis TIME microseconds; see ``shared/ratelimit.py``),
``attempts`` (how many SMTP transactions were begun; the retry budget counts these),
``sending`` (the attempt number whose SMTP transaction is under way),
``rcpt:<address>`` (JSON ``{status: accepted|rejected, code, reply}``),
``response`` (the last reply to the end of DATA).

The one window it cannot close is SMTP's own: a connection lost after the message's final
dot and before the relay's reply. Nobody knows whether the relay took the message; the
ledger still says ``sending``, so the next attempt sends it again (with the same
Message-ID). Outcomes are written as soon as the reply is read, before QUIT, and a write
that meets a Redis outage waits for Redis rather than forget a reply already received.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared import keys
from shared.text import as_str
from worker.retrying import StorePatience

log = logging.getLogger("postroom.worker.ledger")

# how long a reply already received may wait for Redis before it is given up
RECORD_PATIENCE = StorePatience(budget_s=60.0)


@dataclass
class LedgerState:
    done: dict[str, dict[str, Any]] = field(default_factory=dict)
    response: str | None = None
    sending: int | None = None
    attempts: int = 0

    def pending(self, recipients: list[str]) -> list[str]:
        return [r for r in recipients if r not in self.done]

    def with_status(self, status: str, order: list[str]) -> list[str]:
        """The recipients, in ``order``, that ended with ``status``."""
        return [r for r in order if self.done.get(r, {}).get("status") == status]


class Ledger:
    def __init__(self, client: redis.Redis, ttl_s: int) -> None:
        self._r = client
        self._ttl_s = ttl_s

    def load(self, sid: str, task_id: str) -> LedgerState:
        raw = self._r.hgetall(keys.ledger(sid, task_id))
        state = LedgerState()
        for name, value in raw.items():
            key = as_str(name)
            if key.startswith("rcpt:"):
                state.done[key[5:]] = json.loads(value)
            elif key == "response":
                state.response = as_str(value)
            elif key == "sending":
                state.sending = int(value)
            elif key == "attempts":
                state.attempts = int(value)
        return state

    def mark_sending(self, sid: str, task_id: str, attempt: int) -> None:
        """Attempt number ``attempt`` is about to talk SMTP."""
        key = keys.ledger(sid, task_id)
        pipe = self._r.pipeline(transaction=True)
        pipe.hset(key, mapping={"sending": attempt, "attempts": attempt})
        pipe.expire(key, self._ttl_s)
        pipe.execute()

    def record(
        self,
        sid: str,
        task_id: str,
        outcomes: dict[str, dict[str, Any]],
        response: str | None,
    ) -> None:
        """Record recipients that are done (accepted or permanently rejected), atomically.

        The write is idempotent, so while Redis does not answer it is tried again, for up to
        :data:`RECORD_PATIENCE`; then the error is raised."""
        key = keys.ledger(sid, task_id)
        mapping: dict[Any, Any] = {f"rcpt:{r}": json.dumps(v) for r, v in outcomes.items()}
        if response is not None:
            mapping["response"] = response
        waits = RECORD_PATIENCE.waits()
        while True:
            try:
                pipe = self._r.pipeline(transaction=True)
                if mapping:
                    pipe.hset(key, mapping=mapping)
                pipe.hdel(key, "sending")
                pipe.expire(key, self._ttl_s)
                pipe.execute()
                return
            except (RedisConnectionError, RedisTimeoutError):
                wait = next(waits, None)
                if wait is None:
                    raise
                log.warning(
                    "Redis unavailable while recording an SMTP outcome; waiting",
                    extra={"task_id": task_id, "solution_id": sid},
                )
                time.sleep(wait)
