"""From a validated send request to a job on the queue: relay, sender, Message-ID."""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from typing import Any

from postroom.shared.crypto import SecretBox
from postroom.shared.ids import make_message_id, sender_domain
from postroom.shared.relays import DEFAULT_PORTS
from postroom.shared.settings import Settings
from postroom.shared.solutions import Solution


def relay_spec(data: dict[str, Any], solution: Solution, box: SecretBox) -> dict[str, Any] | None:
    """The caller's relay as the job carries it (password sealed), or None for the default."""
    conn = data.get("connection")
    if conn:
        password = conn.get("password")
        scheme = conn.get("scheme", "smtp")
        return {
            "host": conn["server"],
            "port": conn.get("port") or DEFAULT_PORTS[scheme],
            "scheme": scheme,
            "user": conn.get("user") or None,
            "password": box.encrypt(password) if password else None,
        }
    if solution.has_own_relay:
        cfg = solution.config
        scheme = cfg.get("connection_scheme") or ""
        return {
            "host": cfg["connection_server"],
            "port": cfg.get("connection_port") or DEFAULT_PORTS[scheme],
            "scheme": scheme,
            "user": cfg.get("connection_user") or None,
            "password": cfg.get("connection_password"),  # already sealed at rest
        }
    return None


def envelope_sender(data: dict[str, Any], relay: dict[str, Any] | None, settings: Settings) -> str:
    """``from`` if given (own relay only), else the relay's user when it is an address,
    else ``no-reply@<POSTROOM_DEFAULT_SENDER_DOMAIN>``."""
    if data.get("from"):
        return str(data["from"])
    user = relay.get("user") if relay else None
    if user and "@" in user:
        return str(user)
    return f"no-reply@{settings.default_sender_domain}"


def build_job(
    data: dict[str, Any], solution: Solution, settings: Settings, box: SecretBox
) -> dict[str, Any]:
    relay = relay_spec(data, solution, box)
    sender = envelope_sender(data, relay, settings)
    job = {
        "task_id": str(uuid.uuid4()),
        "solution_id": solution.solution_id,
        "created_at": time.time(),
        "message_id": make_message_id(sender_domain(sender)),
        "hlimit": data.get("hLimit"),
        "relay": relay,
        "message": {
            "from": sender,
            "to": data.get("to") or [],
            "cc": data.get("cc") or [],
            "bcc": data.get("bcc") or [],
            "subject": data.get("subject"),
            "text": data.get("text"),
            "html": data.get("html"),
        },
        "metadata": data.get("metadata") or {},
    }
    _add_options(job, data)
    return job


def _add_options(job: dict[str, Any], data: dict[str, Any]) -> None:
    """``reply_to``, ``headers``, the attachments' names and sizes (their bytes are stored
    apart: :mod:`postroom.shared.attachments`) and a future ``send_at``, each only when given, so a
    plain send's job is what it always was."""
    message = job["message"]
    if data.get("reply_to"):
        message["reply_to"] = data["reply_to"]
    if data.get("headers"):
        message["headers"] = data["headers"]
    if data.get("attachments"):
        job["attachments"] = [item.meta() for item in data["attachments"]]
    send_at = data.get("send_at")
    if send_at is not None and send_at > job["created_at"]:
        job["send_at"] = send_at


def body_fingerprint(body: dict[str, Any]) -> str:
    """The same JSON, however it is spaced or ordered, has the same fingerprint."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()
