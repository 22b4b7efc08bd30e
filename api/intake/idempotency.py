"""``Idempotency-Key``: the same key and body within 24 h is the same send.

A key is claimed before its message is enqueued and *confirmed* once the broker has it. A
second request with the key (a client retrying, or the same request sent twice at once)
answers with the first request's task only when that task was confirmed: while the first
request is still enqueueing, the second waits for it, up to :data:`SETTLE_WAIT_S`; when
the first enqueue failed (503, claim released) the second may claim the key and try
itself. So a 202 for a key always names a task the broker took, and however many requests
carry one key, at most one task is made.

A claim that is never confirmed (its API process died mid-request) expires after
:data:`PENDING_TTL_S`.

The same holds for a batch message's own ``idempotency_key``; ``name`` below is what the
caller calls the key, for the errors that name it.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass
from typing import Any

import redis

from postroom.shared import keys
from postroom.shared.errors import Conflict, IdempotencyMismatch, ValidationError
from postroom.shared.redis_values import as_str
from postroom.shared.schemas.validators import CONTROL

MAX_KEY = 255
_KEY_CONTROL = re.compile(f"[{CONTROL}]")
TTL_S = 24 * 3600
PENDING_TTL_S = 60
SETTLE_WAIT_S = 10.0

# KEYS[1] the key's record; ARGV[1] the task id that must own it; ARGV[2] the new value
# (or "" to delete); ARGV[3] its TTL in seconds. Returns 1 when the record was ours.
_IF_OWNER = """
local raw = redis.call('GET', KEYS[1])
if not raw or cjson.decode(raw)['task_id'] ~= ARGV[1] then
  return 0
end
if ARGV[2] == '' then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], ARGV[2], 'EX', tonumber(ARGV[3]))
end
return 1
"""


@dataclass(frozen=True)
class Claim:
    fingerprint: str
    task_id: str
    accepted: bool = False  # the broker has the task


def idempotency_key(value: Any, name: str) -> str:
    """``value`` as an idempotency key: 1 to 255 characters, no control characters; else a
    400 naming ``name``."""
    if (not isinstance(value, str) or not 1 <= len(value) <= MAX_KEY
            or _KEY_CONTROL.search(value)):  # fmt: skip
        raise ValidationError(
            f"invalid {name}",
            fields={name: ["Must be 1 to 255 characters, no control characters."]},
        )
    return value


def replayed(claim: Claim, fingerprint: str, name: str) -> str:
    """The task an earlier request with the same key made; 422 when its body differed."""
    if claim.fingerprint != fingerprint:
        raise IdempotencyMismatch(
            f"this {name} was used with another request body in the last 24 hours"
        )
    return claim.task_id


def _encode(claim: Claim) -> str:
    return json.dumps(
        {"fingerprint": claim.fingerprint, "task_id": claim.task_id, "accepted": claim.accepted}
    )


class IdempotencyStore:
    def __init__(
        self, client: redis.Redis, ttl_s: int = TTL_S, settle_wait_s: float = SETTLE_WAIT_S
    ) -> None:
        self._r = client
        self._ttl_s = ttl_s
        self._settle_wait_s = settle_wait_s
        self._if_owner = client.register_script(_IF_OWNER)

    @staticmethod
    def _key(sid: str, key: str) -> str:
        return keys.idempotency(sid, hashlib.sha256(key.encode()).hexdigest())

    def peek(self, sid: str, key: str) -> Claim | None:
        """The key's claim as it is now, confirmed or not."""
        raw = self._r.get(self._key(sid, key))
        if raw is None:
            return None
        doc = json.loads(as_str(raw))
        return Claim(doc["fingerprint"], doc["task_id"], bool(doc.get("accepted", True)))

    def get(self, sid: str, key: str) -> Claim | None:
        """The key's confirmed claim, or None when nobody holds the key. A claim still being
        enqueued is waited for; one that stays unconfirmed is a 409 ``Conflict``."""
        deadline = time.monotonic() + self._settle_wait_s
        pause = 0.01
        while True:
            claim = self.peek(sid, key)
            if claim is None or claim.accepted:
                return claim
            if time.monotonic() >= deadline:
                raise Conflict(
                    "a request with this Idempotency-Key is still being processed; "
                    "retry in a few seconds"
                )
            time.sleep(pause)
            pause = min(pause * 2, 0.1)

    def claim(self, sid: str, key: str, claim: Claim) -> Claim | None:
        """Take the key for ``claim`` (unconfirmed); None when taken, else the earlier
        request's confirmed claim (waited for, as :meth:`get` does)."""
        value = _encode(Claim(claim.fingerprint, claim.task_id, accepted=False))
        while True:
            if self._r.set(self._key(sid, key), value, nx=True, ex=PENDING_TTL_S):
                return None
            earlier = self.get(sid, key)
            if earlier is not None:
                return earlier
            # the earlier request gave the key up (its enqueue failed): try to take it

    def confirm(self, sid: str, key: str, claim: Claim) -> bool:
        """The broker took ``claim``'s task: replays may now answer with it, for 24 h."""
        value = _encode(Claim(claim.fingerprint, claim.task_id, accepted=True))
        return bool(
            self._if_owner(keys=[self._key(sid, key)], args=[claim.task_id, value, self._ttl_s])
        )

    def release(self, sid: str, key: str, task_id: str) -> bool:
        """Give the key up after a failed enqueue (only if ``task_id`` still holds it)."""
        return bool(self._if_owner(keys=[self._key(sid, key)], args=[task_id, "", 0]))
