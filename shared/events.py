"""Delivery events: what a caller's webhook endpoints are told, and how it is signed.

An event is queued in the same atomic step as the change it reports (one Lua step,
``shared/lua/event_emit.lua``): the worker's last step of an attempt (``email.sent``,
``email.rejected``, ``email.failed``, ``email.retrying``: :func:`finish_events`, carried by
``attempt_finish.lua``), a new suppression (``suppression.created``) and a test
(``webhook.test``). Any other change of a task calls :func:`emit` (alone, or queued on a
MULTI pipeline beside the change) or, inside a Lua script, joins ``event_emit`` as a
function and calls it. The ``postroom worker`` processes deliver them
(:mod:`postroom.worker.webhooks`).

Each event is a JSON body ``{type, timestamp, data}`` POSTed with the Standard Webhooks
headers: ``webhook-id`` (the event's id, the same on every retry), ``webhook-timestamp``
(Unix seconds of this attempt) and ``webhook-signature`` (``v1,<base64 HMAC-SHA256 of
"{id}.{timestamp}.{body}">``, one per secret in force, space-separated).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import redis

from postroom.shared import keys
from postroom.shared.scripts import script
from postroom.shared.solutions import iso

EMAIL_SENT = "email.sent"
EMAIL_FAILED = "email.failed"
EMAIL_RETRYING = "email.retrying"
EMAIL_REJECTED = "email.rejected"
EMAIL_CANCELED = "email.canceled"
SUPPRESSION_CREATED = "suppression.created"
WEBHOOK_TEST = "webhook.test"

#: every event type an endpoint may subscribe to ("*": all of them)
EVENT_TYPES = (
    EMAIL_SENT,
    EMAIL_FAILED,
    EMAIL_RETRYING,
    EMAIL_REJECTED,
    EMAIL_CANCELED,
    SUPPRESSION_CREATED,
    WEBHOOK_TEST,
)
ALL = "*"
SECRET_PREFIX = "whsec_"

#: the events a task document's state makes when it is written
_BY_STATE: dict[str, tuple[str, ...]] = {
    "sent": (EMAIL_SENT,),
    "failed": (EMAIL_FAILED,),
    "retrying": (EMAIL_RETRYING,),
    "canceled": (EMAIL_CANCELED,),
}


def new_event_id() -> str:
    """A ``webhook-id``: ``msg_`` and 32 hex digits."""
    return "msg_" + uuid.uuid4().hex


def new_secret() -> str:
    """``whsec_`` and the base64 of 32 random bytes (as the specification's libraries read)."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def secret_bytes(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix(SECRET_PREFIX))


def sign(secret: str, event_id: str, timestamp: int, body: bytes) -> str:
    """One ``v1,<signature>`` of ``body`` sent as ``event_id`` at ``timestamp``."""
    signed = f"{event_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret_bytes(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signature_header(secrets_in_force: Sequence[str], event_id: str, timestamp: int,
                     body: bytes) -> str:  # fmt: skip
    """``webhook-signature``: one signature per secret, space-separated (a rotated secret
    signs beside the new one for a while)."""
    return " ".join(sign(s, event_id, timestamp, body) for s in secrets_in_force)


def email_event_types(doc: Mapping[str, Any]) -> tuple[str, ...]:
    """The events a task document makes when it is written: by its state, and
    ``email.rejected`` beside ``email.sent`` when some recipient was refused."""
    types = _BY_STATE.get(str(doc.get("state")), ())
    result = doc.get("result") or {}
    if types == (EMAIL_SENT,) and result.get("rejected"):
        types = (EMAIL_SENT, EMAIL_REJECTED)
    return types


def finish_events(sid: str, doc: Mapping[str, Any]) -> str:
    """``attempt_finish.lua``'s ARGV[8] for writing ``doc``: the events it makes, or ""."""
    types = email_event_types(doc)
    if not types:
        return ""
    now = time.time()
    return json.dumps({
        "prefix": keys.webhook_prefix(sid),
        "now": repr(now),
        "timestamp": iso(now),
        "events": [[new_event_id(), kind] for kind in types],
    })  # fmt: skip


def body(kind: str, data: Any, now: float | None = None) -> str:
    """An event's JSON body."""
    stamp = iso(time.time() if now is None else now)
    return json.dumps({"type": kind, "timestamp": stamp, "data": data})


def emit_args(sid: str, events: Sequence[tuple[str, Any]], only: str = "",
              now: float | None = None) -> tuple[list[str], list[str]]:  # fmt: skip
    """The keys and arguments of ``event_emit.lua`` for ``events`` (type, data)."""
    moment = time.time() if now is None else now
    args = [keys.webhook_prefix(sid), repr(moment), only]
    for kind, data in events:
        args += [new_event_id(), kind, body(kind, data, moment)]
    return [keys.webhooks(sid)], args


def emit(client: redis.Redis, sid: str, events: Sequence[tuple[str, Any]],
         only: str = "") -> int:  # fmt: skip
    """Queue ``events`` (type, data) for the solution's subscribed endpoints (``only``: that
    endpoint, whatever it subscribes to); how many deliveries were queued."""
    script_keys, args = emit_args(sid, events, only)
    return int(script("event_emit")(client, script_keys, args))


def emit_with(client: redis.Redis, sid: str, events: Sequence[tuple[str, Any]],
              change: Any) -> list[Any]:  # fmt: skip
    """Run ``change(pipe)`` (Redis commands queued on a MULTI pipeline) and queue ``events``
    in the same transaction; the change's replies. Should Redis have forgotten the script
    (a restart), the change is made and the events queued right after it."""
    run = script("event_emit")
    script_keys, args = emit_args(sid, events)
    pipe = client.pipeline(transaction=True)
    change(pipe)
    run.queue(pipe, script_keys, args)
    replies: list[Any] = pipe.execute(raise_on_error=False)
    if isinstance(replies[-1], redis.exceptions.NoScriptError):
        run(client, script_keys, args)
    for reply in replies[:-1]:
        if isinstance(reply, Exception):
            raise reply
    return replies[:-1]
