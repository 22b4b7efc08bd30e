"""A solution's suppression list, and the bounce and complaint events that feed it.

``GET …/suppressions`` lists it; ``GET/PUT/DELETE …/suppressions/{email}`` reads, adds
(201, or 200 when it replaced an entry in force) and lifts (204) one address; ``POST
…/events`` ingests a bounce or complaint reported upstream and suppresses the address at
once. Addresses in the path are normalized and compared case-insensitively.

A complaint entry is the service's defence of its senders' reputation: a solution's token
may not replace or lift one (403), only the admin token may.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify, request

from postroom.api.auth import Principal
from postroom.api.body import json_object
from postroom.api.services import Services, services
from postroom.shared.errors import Forbidden, NotFound
from postroom.shared.schemas import email_param, load_or_raise
from postroom.shared.solutions import iso
from postroom.shared.suppressions import Suppression

bp = Blueprint("suppressions", __name__)

ONE = "/solutions/<sid>/suppressions/<path:email>"


def view(entry: Suppression) -> dict[str, Any]:
    return {
        "email": entry.email,
        "reason": entry.reason,
        "created_at": iso(entry.created_at),
        "expires_at": iso(entry.expires_at),
        "detail": entry.detail,
    }


def _open(sid: str) -> tuple[Services, Principal]:
    svc = services()
    principal, _ = svc.authorize(sid)  # 404 for a solution that does not exist
    return svc, principal


def _guard_complaint(current: Suppression | None, principal: Principal) -> None:
    if current is not None and current.reason == "complaint" and not principal.admin:
        raise Forbidden("only the admin token may change or lift a complaint suppression")


@bp.get("/solutions/<sid>/suppressions")
def index(sid: str) -> Response:
    svc, _ = _open(sid)
    return jsonify({"suppressions": [view(e) for e in svc.suppressions.entries(sid)]})


@bp.get(ONE)
def show(sid: str, email: str) -> Response:
    svc, _ = _open(sid)
    address = email_param(email)
    entry = svc.suppressions.get(sid, address)
    if entry is None:
        raise NotFound(f"{address} is not suppressed")
    return jsonify(view(entry))


@bp.put(ONE)
def put(sid: str, email: str) -> tuple[Response, int]:
    svc, principal = _open(sid)
    address = email_param(email)
    body = json_object() if request.get_data(cache=True) else {}
    data = load_or_raise(svc.schemas.suppression, body)
    _guard_complaint(svc.suppressions.get(sid, address), principal)
    entry, created = svc.suppressions.put(
        sid, address, data["reason"], expires_at=data.get("expires_at")
    )
    return jsonify(view(entry)), 201 if created else 200


@bp.delete(ONE)
def delete(sid: str, email: str) -> tuple[str, int]:
    svc, principal = _open(sid)
    address = email_param(email)
    _guard_complaint(svc.suppressions.get(sid, address), principal)
    svc.suppressions.remove(sid, address)
    return "", 204


@bp.post("/solutions/<sid>/events")
def ingest(sid: str) -> Response:
    """A bounce reported upstream is a hard bounce (the final word of a receiving server
    on that address): like a complaint, it suppresses at once, without counting."""
    svc, _ = _open(sid)
    data = load_or_raise(svc.schemas.event, json_object())
    entry = svc.suppressions.ingest(sid, data["email"], data["type"], data.get("detail"))
    return jsonify(view(entry))
