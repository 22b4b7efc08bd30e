"""``Idempotency-Key``: the same key and body within 24 h is the same send."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import redis

from shared import keys

TTL_S = 24 * 3600


@dataclass(frozen=True)
class Claim:
    fingerprint: str
    task_id: str


class IdempotencyStore:
    def __init__(self, client: redis.Redis, ttl_s: int = TTL_S) -> None:
        self._r = client
        self._ttl_s = ttl_s

    @staticmethod
    def _key(sid: str, key: str) -> str:
        return keys.idempotency(sid, hashlib.sha256(key.encode()).hexdigest())

    def get(self, sid: str, key: str) -> Claim | None:
        raw = self._r.get(self._key(sid, key))
        if raw is None:
            return None
        doc = json.loads(raw)
        return Claim(doc["fingerprint"], doc["task_id"])

    def claim(self, sid: str, key: str, claim: Claim) -> Claim | None:
        """Take the key for ``claim``; returns None when taken, else the earlier claim."""
        value = json.dumps({"fingerprint": claim.fingerprint, "task_id": claim.task_id})
        if self._r.set(self._key(sid, key), value, nx=True, ex=self._ttl_s):
            return None
        return self.get(sid, key) or claim

    def release(self, sid: str, key: str) -> None:
        self._r.delete(self._key(sid, key))
