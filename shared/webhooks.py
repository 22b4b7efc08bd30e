"""Each solution's webhook endpoints: where its delivery events are POSTed.

Storage: one hash per solution (``keys.webhooks``), field = the endpoint id, value = JSON::

    {id, url, events, description, enabled, created_at,
     secrets: [{sealed, until}],        # sealed with POSTROOM_SECRET_KEY; until: None or
                                        # the Unix time a rotated-out secret stops signing
     failing_since, disabled_at, disabled_reason}

The secret is never stored or logged in clear: it is shown once, when made (at creation and
by :meth:`WebhookStore.rotate`). Changes are one Lua step (``webhook_update.lua``), as are
the workers' (``webhook_finish.lua``): neither overwrites the other. The set
``keys.webhook_endpoints`` names every endpoint (``sid/id``) for the workers to look at.
"""

from __future__ import annotations

import json
import secrets as random
import time
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import redis

from postroom.shared import keys
from postroom.shared.crypto import SecretBox
from postroom.shared.events import new_secret
from postroom.shared.guard import RelayGuard, Resolver, system_resolver
from postroom.shared.redis_values import as_str
from postroom.shared.scripts import script
from postroom.shared.solutions import iso

#: endpoints a solution may have
MAX_ENDPOINTS = 20
#: how long a rotated-out secret keeps signing beside the new one
ROTATION_GRACE_S = 86400
#: entries kept in an endpoint's delivery log
LOG_SIZE = 100


def new_id() -> str:
    return "wh_" + random.token_hex(8)


def member(sid: str, wid: str) -> str:
    return f"{sid}/{wid}"


class WebhookStore:
    def __init__(self, client: redis.Redis, box: SecretBox) -> None:
        self._r = client
        self._box = box

    # -- reads ----------------------------------------------------------------------

    def all(self, sid: str) -> list[dict[str, Any]]:
        raws = self._r.hvals(keys.webhooks(sid))
        return sorted((json.loads(raw) for raw in raws), key=lambda r: (r["created_at"], r["id"]))

    def get(self, sid: str, wid: str) -> dict[str, Any] | None:
        raw = self._r.hget(keys.webhooks(sid), wid)
        return None if raw is None else dict(json.loads(raw))

    def count(self, sid: str) -> int:
        return int(self._r.hlen(keys.webhooks(sid)))

    def pending(self, sid: str, wid: str) -> int:
        """Events queued for the endpoint and not yet delivered (or given up)."""
        return int(self._r.hlen(keys.webhook_pending(sid, wid)))

    def deliveries(self, sid: str, wid: str) -> list[dict[str, Any]]:
        """The delivery log, newest first."""
        return [json.loads(raw) for raw in self._r.lrange(keys.webhook_log(sid, wid), 0, -1)]

    def secrets_in_force(self, record: Mapping[str, Any], now: float | None = None) -> list[str]:
        """The secrets that sign now, the newest first."""
        moment = time.time() if now is None else now
        return [self._box.decrypt(s["sealed"]) for s in record["secrets"]
                if s.get("until") is None or s["until"] > moment]  # fmt: skip

    # -- writes ---------------------------------------------------------------------

    def create(self, sid: str, url: str, events: Sequence[str],
               description: str | None) -> tuple[dict[str, Any], str]:  # fmt: skip
        """A new endpoint; the record and its secret (shown this once)."""
        secret = new_secret()
        now = time.time()
        record: dict[str, Any] = {
            "id": new_id(),
            "url": url,
            "events": list(events),
            "description": description,
            "enabled": True,
            "created_at": iso(now),
            "secrets": [{"sealed": self._box.encrypt(secret), "until": None}],
            "failing_since": None,
            "disabled_at": None,
            "disabled_reason": None,
        }
        pipe = self._r.pipeline(transaction=True)
        pipe.hset(keys.webhooks(sid), record["id"], json.dumps(record))
        pipe.sadd(keys.webhook_endpoints(), member(sid, record["id"]))
        pipe.execute()
        return record, secret

    def update(self, sid: str, wid: str, changes: Mapping[str, Any]) -> dict[str, Any] | None:
        """Set ``changes`` on the record (None: no such endpoint). Enabling an endpoint
        clears why it was disabled and its failing streak."""
        patch = dict(changes)
        if patch.get("enabled") is True:
            patch.update(failing_since=None, disabled_at=None, disabled_reason=None)
        raw = script("webhook_update")(self._r, [keys.webhooks(sid)], [wid, json.dumps(patch)])
        return None if raw is None else dict(json.loads(as_str(raw)))

    def rotate(self, sid: str, wid: str, now: float | None = None) -> str | None:
        """A new secret (returned, shown this once); the one signing until now keeps
        signing beside it for :data:`ROTATION_GRACE_S`. None: no such endpoint."""
        record = self.get(sid, wid)
        if record is None:
            return None
        moment = time.time() if now is None else now
        secret = new_secret()
        kept = [
            {"sealed": s["sealed"], "until": moment + ROTATION_GRACE_S if s.get("until") is None
             else s["until"]}
            for s in record["secrets"]
            if s.get("until") is None or s["until"] > moment
        ]  # fmt: skip
        fresh = [{"sealed": self._box.encrypt(secret), "until": None}, *kept]
        if self.update(sid, wid, {"secrets": fresh}) is None:
            return None
        return secret

    def delete(self, sid: str, wid: str) -> bool:
        """Remove the endpoint, its queued events and its log; whether it was there."""
        pipe = self._r.pipeline(transaction=True)
        pipe.hdel(keys.webhooks(sid), wid)
        pipe.delete(keys.webhook_due(sid, wid), keys.webhook_pending(sid, wid),
                    keys.webhook_log(sid, wid))  # fmt: skip
        pipe.srem(keys.webhook_endpoints(), member(sid, wid))
        removed = pipe.execute()[0]
        return bool(removed)


def view(record: Mapping[str, Any], pending: int | None = None) -> dict[str, Any]:
    """An endpoint as the API shows it: never a secret."""
    out = {
        "id": record["id"],
        "url": record["url"],
        "events": record["events"],
        "description": record.get("description"),
        "enabled": bool(record.get("enabled")),
        "created_at": record["created_at"],
        "disabled_reason": record.get("disabled_reason"),
        "disabled_at": _iso_or_none(record.get("disabled_at")),
        "failing_since": _iso_or_none(record.get("failing_since")),
    }
    if pending is not None:
        out["pending"] = pending
    return out


def _iso_or_none(value: Any) -> str | None:
    return None if value is None else iso(float(value))


class WebhookGuard(RelayGuard):
    """The relay address guard for webhook URLs: the same address rules, any port, and
    ``POSTROOM_WEBHOOK_ALLOW_HOSTS`` for the exemptions."""

    def __init__(self, allow_hosts: Sequence[str], resolver: Resolver = system_resolver) -> None:
        super().__init__(allow_hosts, (), resolver=resolver)

    def _check_port(self, port: int) -> None:
        return None


def url_target(url: str) -> tuple[str, int]:
    """The host and port a webhook URL names (port by scheme when absent)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    return host, parts.port or (443 if parts.scheme.lower() == "https" else 80)
