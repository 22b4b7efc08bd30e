"""The job built from a send and its solution: relay spec, envelope sender, Message-ID."""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from typing import Any

from postroom.shared.crypto import SecretBox
from postroom.shared.ids import make_message_id, sender_domain
from postroom.shared.records import Job, Message, RelaySpec, SendRequest
from postroom.shared.relays import chosen_relay
from postroom.shared.settings import Settings
from postroom.shared.solutions import Solution


def envelope_sender(data: SendRequest, relay: RelaySpec | None, settings: Settings) -> str:
    """``from`` if given (own relay only), else the relay's user when it is an address,
    else ``no-reply@<POSTROOM_DEFAULT_SENDER_DOMAIN>``."""
    if data.get("from"):
        return str(data["from"])
    user = relay.get("user") if relay else None
    if user and "@" in user:
        return str(user)
    return f"no-reply@{settings.default_sender_domain}"


def build_job(data: SendRequest, solution: Solution, settings: Settings, box: SecretBox) -> Job:
    """The job of ``data``: its relay (the request's, else the solution's: password sealed),
    its sender, a new task id and Message-ID. ``reply_to``, ``headers``, the attachments'
    names and sizes (their bytes are stored apart: :mod:`postroom.shared.attachments`) and a future
    ``send_at`` are carried only when given."""
    relay = chosen_relay(data.get("connection"), solution.config, box.encrypt)
    sender = envelope_sender(data, relay, settings)
    message: Message = {
        "from": sender,
        "to": data.get("to") or [],
        "cc": data.get("cc") or [],
        "bcc": data.get("bcc") or [],
        "subject": data.get("subject"),
        "text": data.get("text"),
        "html": data.get("html"),
    }
    if data.get("reply_to"):
        message["reply_to"] = data["reply_to"]
    if data.get("headers"):
        message["headers"] = data["headers"]
    job: Job = {
        "task_id": str(uuid.uuid4()),
        "solution_id": solution.solution_id,
        "created_at": time.time(),
        "message_id": make_message_id(sender_domain(sender)),
        "hlimit": data.get("hLimit"),
        "relay": relay,
        "message": message,
        "metadata": data.get("metadata") or {},
    }
    if data.get("attachments"):
        job["attachments"] = [item.meta() for item in data["attachments"]]
    send_at = data.get("send_at")
    if send_at is not None and send_at > job["created_at"]:
        job["send_at"] = send_at
    return job


def recipients_of(job: Job) -> list[str]:
    message = job["message"]
    return [*message["to"], *message["cc"], *message["bcc"]]


def state_of(job: Job) -> str:
    """The state of a job's first document: ``scheduled`` for a send later (a ``send_at``
    in the future when it was built), else ``queued``."""
    return "scheduled" if "send_at" in job else "queued"


def body_fingerprint(body: dict[str, Any]) -> str:
    """The same JSON, however it is spaced or ordered, has the same fingerprint."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()
