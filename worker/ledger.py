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

The worker writes it in two steps of :mod:`postroom.worker.attempt_store`: the bucket script that
lets an
attempt send also sets ``sending``/``attempts``, and the attempt's last step records the
outcomes (and ends ``sending``) with the document. :meth:`Ledger.record` is that write on
its own, with patience, for when that step meets a Redis outage.

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

from postroom.shared import keys
from postroom.shared.redis_values import as_str
from postroom.worker.retrying import StorePatience

log = logging.getLogger("postroom.worker.ledger")

# how long a reply already received may wait for Redis before it is given up
RECORD_PATIENCE = StorePatience(budget_s=60.0)


@dataclass
class Outcomes:
    """What one attempt learnt on the wire and has not written down yet: per recipient
    ``{status, code, reply}``, and the reply to the end of DATA."""

    recipients: dict[str, dict[str, Any]] = field(default_factory=dict)
    response: str | None = None

    def add(self, recipients: dict[str, dict[str, Any]], response: str | None = None) -> None:
        self.recipients.update(recipients)
        if response is not None:
            self.response = response

    def fields(self) -> dict[str, str]:
        """The ledger fields that record them."""
        written = {f"rcpt:{r}": json.dumps(v) for r, v in self.recipients.items()}
        if self.response is not None:
            written["response"] = self.response
        return written


@dataclass
class LedgerState:
    done: dict[str, dict[str, Any]] = field(default_factory=dict)
    response: str | None = None
    sending: int | None = None
    attempts: int = 0

    @classmethod
    def from_fields(cls, raw: dict[Any, Any]) -> LedgerState:
        """The state a ledger hash (as HGETALL reads it) describes."""
        state = cls()
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

    def after(self, outcomes: Outcomes) -> LedgerState:
        """The state the ledger reads once ``outcomes`` are recorded (which ends
        ``sending``): built here rather than read back."""
        return LedgerState(
            done={**self.done, **outcomes.recipients},
            response=self.response if outcomes.response is None else outcomes.response,
            sending=None,
            attempts=self.attempts,
        )

    def pending(self, recipients: list[str]) -> list[str]:
        return [r for r in recipients if r not in self.done]

    def with_status(self, status: str, order: list[str]) -> list[str]:
        """The recipients, in ``order``, that ended with ``status``."""
        return [r for r in order if self.done.get(r, {}).get("status") == status]


class Ledger:
    def __init__(self, client: redis.Redis, ttl_s: int) -> None:
        self._r = client
        self.ttl_s = ttl_s

    def load(self, sid: str, task_id: str) -> LedgerState:
        return LedgerState.from_fields(self._r.hgetall(keys.ledger(sid, task_id)))

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
        mapping: dict[Any, Any] = Outcomes(outcomes, response).fields()
        waits = RECORD_PATIENCE.waits()
        while True:
            try:
                pipe = self._r.pipeline(transaction=True)
                if mapping:
                    pipe.hset(key, mapping=mapping)
                pipe.hdel(key, "sending")
                pipe.expire(key, self.ttl_s)
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
