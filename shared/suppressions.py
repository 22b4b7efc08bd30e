"""Each solution's suppression list, and the bounce counts that feed it.

An address on the list is not sent to: intake answers 429 ``Blocked``. It gets there by
``PUT …/suppressions/{email}`` (reason ``manual`` unless said), by an ingested bounce or
complaint event, or automatically: ``threshold`` (``POSTROOM_BOUNCE_THRESHOLD``) permanent
RCPT rejections (5xx) of the address within seven days suppress it with reason ``bounce``.
A threshold of 0 turns the automatic suppression off.

Storage: one hash per solution (``keys.suppressions``), field = the address's comparison
key (:func:`postroom.shared.schemas.address_key`: case-folded), value = JSON
``{email, reason, created_at, expires_at, detail}`` (times in epoch seconds; ``expires_at``
None = never). Redis cannot expire a hash field, so an expired entry is ignored when read
and removed when the list is read whole. Bounces are a sorted set per address
(``keys.bounces``), one member per message, scored by time, trimmed to the window.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import redis

from postroom.shared import keys
from postroom.shared.events import SUPPRESSION_CREATED, emit_args, emit_with
from postroom.shared.redis_values import as_str
from postroom.shared.schemas.addresses import address_key
from postroom.shared.scripts import script
from postroom.shared.solutions import iso

BOUNCE_WINDOW_S = 7 * 86400
# the stronger reason wins when an event meets an entry that is already there
RANK = {"manual": 0, "bounce": 1, "complaint": 2}

# KEYS[1] the address's bounce set, KEYS[2] the solution's suppression hash,
# KEYS[3] the solution's webhook endpoints (keys.webhooks)
# ARGV[1] now (s), ARGV[2] window (s), ARGV[3] threshold, ARGV[4] member (the message),
# ARGV[5] the hash field, ARGV[6] the entry to write when the threshold is reached,
# ARGV[7...] event_emit's arguments for the suppression.created event it then makes
# Returns 1 when this bounce suppressed the address, else 0. An entry already there and
# not expired is kept (a complaint stays a complaint); the count restarts once suppressed.
_RECORD_BOUNCE_BODY = """
local now = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
redis.call('ZADD', KEYS[1], now, ARGV[4])
redis.call('EXPIRE', KEYS[1], math.ceil(window))
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[3]) then
  return 0
end
redis.call('DEL', KEYS[1])
local current = redis.call('HGET', KEYS[2], ARGV[5])
if current then
  local expires = cjson.decode(current)['expires_at']
  if expires == nil or expires == cjson.null or tonumber(expires) > now then
    return 0
  end
end
redis.call('HSET', KEYS[2], ARGV[5], ARGV[6])
event_emit({ KEYS[3] }, { unpack(ARGV, 7) })
return 1
"""

# KEYS[1] the suppression hash; ARGV[1] the field, ARGV[2] the value read earlier.
# Deletes the field only if it still holds that value (an expired entry being purged must
# not take a newer one with it).
_DELETE_IF_SAME = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  return redis.call('HDEL', KEYS[1], ARGV[1])
end
return 0
"""


@dataclass(frozen=True)
class Suppression:
    email: str
    reason: str
    created_at: float
    expires_at: float | None = None
    detail: str | None = None

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and self.expires_at <= now

    def to_json(self) -> str:
        return json.dumps(
            {
                "email": self.email,
                "reason": self.reason,
                "created_at": self.created_at,
                "expires_at": self.expires_at,
                "detail": self.detail,
            }
        )

    @classmethod
    def from_json(cls, raw: bytes | str) -> Suppression:
        doc = json.loads(raw)
        return cls(
            email=doc["email"],
            reason=doc["reason"],
            created_at=float(doc["created_at"]),
            expires_at=None if doc.get("expires_at") is None else float(doc["expires_at"]),
            detail=doc.get("detail"),
        )


class SuppressionStore:
    def __init__(
        self,
        client: redis.Redis,
        bounce_threshold: int = 3,
        bounce_window_s: float = BOUNCE_WINDOW_S,
    ) -> None:
        self._r = client
        self.bounce_threshold = bounce_threshold
        self.bounce_window_s = bounce_window_s
        self._record_bounce = client.register_script(
            script("event_emit").function_text() + "\n" + _RECORD_BOUNCE_BODY
        )
        self._delete_if_same = client.register_script(_DELETE_IF_SAME)

    # -- reads ----------------------------------------------------------------------

    def get(self, sid: str, email: str, now: float | None = None) -> Suppression | None:
        """The entry of ``email`` (any case), or None when absent or expired."""
        raw = self._r.hget(keys.suppressions(sid), address_key(email))
        if raw is None:
            return None
        entry = Suppression.from_json(raw)
        return None if entry.expired(_now(now)) else entry

    def blocked(self, sid: str, emails: Iterable[str], now: float | None = None) -> list[str]:
        """Those of ``emails`` (normalized addresses) on the list now, in order, once each."""
        pipe = self._r.pipeline(transaction=False)
        read = self.queue_blocked(pipe, sid, emails, now)
        return read(pipe.execute()[0]) if len(pipe) else read(None)

    def queue_blocked(
        self, pipe: Any, sid: str, emails: Iterable[str], now: float | None = None
    ) -> Callable[[Any], list[str]]:
        """Queue on ``pipe`` the read :meth:`blocked` makes (nothing when ``emails`` is
        empty); returns what turns its reply into :meth:`blocked`'s answer."""
        unique = list(dict.fromkeys(emails))
        if unique:
            pipe.hmget(keys.suppressions(sid), [address_key(e) for e in unique])

        def read(raws: Any) -> list[str]:
            if not unique:
                return []
            return in_force(unique, raws, now)

        return read

    def entries(self, sid: str, now: float | None = None) -> list[Suppression]:
        """Every entry in force, by address; expired ones are removed on the way."""
        key = keys.suppressions(sid)
        moment = _now(now)
        entries: list[Suppression] = []
        for field, raw in self._r.hscan_iter(key, count=500):
            entry = Suppression.from_json(raw)
            if entry.expired(moment):
                self._delete_if_same(keys=[key], args=[field, raw])
            else:
                entries.append(entry)
        return sorted(entries, key=lambda e: address_key(e.email))

    # -- writes ---------------------------------------------------------------------

    def put(
        self,
        sid: str,
        email: str,
        reason: str,
        *,
        expires_at: float | None = None,
        detail: str | None = None,
        now: float | None = None,
    ) -> tuple[Suppression, bool]:
        """Suppress ``email`` (replacing its entry); returns it and whether it is new (no
        entry in force was there)."""
        moment = _now(now)
        created = self.get(sid, email, moment) is None
        entry = Suppression(email, reason, moment, expires_at, detail)

        def write(pipe: Any) -> None:
            pipe.hset(keys.suppressions(sid), address_key(email), entry.to_json())

        if created:  # the entry and its suppression.created event, in one step
            emit_with(self._r, sid, [(SUPPRESSION_CREATED, event_data(sid, entry))], write)
        else:
            pipe = self._r.pipeline(transaction=False)
            write(pipe)
            pipe.execute()
        return entry, created

    def ingest(
        self, sid: str, email: str, reason: str, detail: str | None = None,
        now: float | None = None,
    ) -> Suppression:
        """A reported bounce or complaint: suppress at once, without expiry. An entry in
        force with an equal or stronger reason and no expiry is kept as it is."""
        moment = _now(now)
        current = self.get(sid, email, moment)
        if (
            current is not None
            and current.expires_at is None
            and RANK[current.reason] >= RANK[reason]
        ):
            return current
        entry, _ = self.put(sid, email, reason, detail=detail, now=moment)
        return entry

    def remove(self, sid: str, email: str) -> bool:
        """Lift a suppression (its bounce count restarts too); whether one was there."""
        pipe = self._r.pipeline(transaction=True)
        pipe.hdel(keys.suppressions(sid), address_key(email))
        pipe.delete(keys.bounces(sid, address_key(email)))
        removed, _ = pipe.execute()
        return bool(removed)

    # -- bounces --------------------------------------------------------------------

    def record_bounces(
        self,
        sid: str,
        outcomes: Mapping[str, Mapping[str, Any]],
        message_id: str | None = None,
        now: float | None = None,
    ) -> list[str]:
        """Count the permanent RCPT rejections among a transaction's per-recipient
        ``outcomes`` (``{address: {status, code, reply}}``: ``status`` "rejected" with a
        5xx ``code``); returns the addresses this suppressed. ``message_id`` makes a
        message count once per address however often its outcomes are recorded."""
        if self.bounce_threshold <= 0:
            return []
        moment = _now(now)
        member = message_id or uuid.uuid4().hex
        suppressed: list[str] = []
        for email, outcome in outcomes.items():
            if not _hard_bounce(outcome):
                continue
            entry = Suppression(email, "bounce", moment, None, _detail(outcome))
            field = address_key(email)
            args: list[Any] = [
                repr(moment), repr(float(self.bounce_window_s)), self.bounce_threshold,
                member, field, entry.to_json(),
            ]
            _, emit_args_ = emit_args(sid, [(SUPPRESSION_CREATED, event_data(sid, entry))],
                                      now=moment)
            args += emit_args_
            script_keys = [keys.bounces(sid, field), keys.suppressions(sid), keys.webhooks(sid)]
            if self._record_bounce(keys=script_keys, args=args):
                suppressed.append(email)
        return suppressed

    def bounce_count(self, sid: str, email: str) -> int:
        """Permanent rejections of ``email`` counted now (within the window)."""
        key = keys.bounces(sid, address_key(email))
        low = _now(None) - self.bounce_window_s
        return int(self._r.zcount(key, low, "+inf"))


def event_data(sid: str, entry: Suppression) -> dict[str, Any]:
    """A ``suppression.created`` event's ``data``."""
    return {
        "solution_id": sid,
        "email": entry.email,
        "reason": entry.reason,
        "created_at": iso(entry.created_at),
        "expires_at": None if entry.expires_at is None else iso(entry.expires_at),
        "detail": entry.detail,
    }


def _hard_bounce(outcome: Mapping[str, Any]) -> bool:
    code = outcome.get("code")
    return (
        outcome.get("status") == "rejected"
        and isinstance(code, int)
        and not isinstance(code, bool)
        and 500 <= code < 600
    )


def _detail(outcome: Mapping[str, Any]) -> str | None:
    reply = outcome.get("reply")
    return as_str(reply)[:500] if reply else None


def in_force(
    emails: Iterable[str], raws: Iterable[bytes | str | None], now: float | None = None
) -> list[str]:
    """The ``emails`` whose suppression entry (``raws``: the list's values for them, in the
    same order, None where there is none) is in force at ``now``."""
    moment = _now(now)
    return [
        email
        for email, raw in zip(emails, raws, strict=True)
        if raw is not None and not Suppression.from_json(raw).expired(moment)
    ]


def _now(now: float | None) -> float:
    return time.time() if now is None else now
