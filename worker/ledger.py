"""The send ledger: what has happened to one message at the SMTP level.

It is what makes at-least-once delivery from the broker exactly-once on the wire: a
redelivered job reads which recipients are done and sends only to the others; a job
whose every recipient is done finishes from the ledger without talking SMTP again.

Fields of the hash ``keys.ledger(sid, task_id)``:
``token`` (set by the bucket script when the message took its hLimit token),
``sending`` (the attempt number whose SMTP transaction is under way),
``rcpt:<address>`` (JSON ``{status: accepted|rejected, code, reply}``),
``response`` (the last reply to the end of DATA).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import redis

from shared import keys
from shared.text import as_str


@dataclass
class LedgerState:
    done: dict[str, dict[str, Any]] = field(default_factory=dict)
    response: str | None = None
    sending: int | None = None

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
        return state

    def mark_sending(self, sid: str, task_id: str, attempt: int) -> None:
        key = keys.ledger(sid, task_id)
        pipe = self._r.pipeline(transaction=True)
        pipe.hset(key, "sending", attempt)
        pipe.expire(key, self._ttl_s)
        pipe.execute()

    def record(
        self,
        sid: str,
        task_id: str,
        outcomes: dict[str, dict[str, Any]],
        response: str | None,
    ) -> None:
        """Record recipients that are done (accepted or permanently rejected), atomically."""
        key = keys.ledger(sid, task_id)
        mapping: dict[Any, Any] = {f"rcpt:{r}": json.dumps(v) for r, v in outcomes.items()}
        if response is not None:
            mapping["response"] = response
        pipe = self._r.pipeline(transaction=True)
        if mapping:
            pipe.hset(key, mapping=mapping)
        pipe.hdel(key, "sending")
        pipe.expire(key, self._ttl_s)
        pipe.execute()
