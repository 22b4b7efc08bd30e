"""A solution's webhook endpoints (:mod:`postroom.shared.webhooks`) and their delivery log.

``POST …/webhooks`` creates one (201, with its secret: shown this once), ``GET …/webhooks``
lists them, ``GET|PATCH|DELETE …/webhooks/{id}`` reads, changes and removes one,
``POST …/webhooks/{id}/test`` queues a ``webhook.test`` event for it now,
``POST …/webhooks/{id}/rotate-secret`` makes a new secret (the old one signs beside it for
24 h), ``GET …/webhooks/{id}/deliveries`` is its delivery log, newest first. A solution's
token or the admin token.
"""

from __future__ import annotations

import time
from typing import Any

from flask import Blueprint, Response, jsonify

from postroom.api.body import json_object
from postroom.api.services import Services, services
from postroom.shared import events
from postroom.shared.errors import Conflict, InvalidRelay, NotFound, ValidationError
from postroom.shared.schemas import load_or_raise
from postroom.shared.solutions import iso
from postroom.shared.webhooks import MAX_ENDPOINTS, url_target, view

bp = Blueprint("webhooks", __name__)

ALL = "/solutions/<sid>/webhooks"
ONE = "/solutions/<sid>/webhooks/<wid>"


def _open(sid: str) -> Services:
    svc = services()
    svc.authorize(sid)  # 401, then 404 for a solution that does not exist or is not yours
    return svc


def _record(svc: Services, sid: str, wid: str) -> dict[str, Any]:
    record = svc.webhooks.get(sid, wid)
    if record is None:
        raise NotFound(f"webhook {wid!r} not found")
    return record


def _check_url(svc: Services, url: str) -> None:
    """The address guard, as for relays (a name that does not resolve now passes: the
    worker checks again, on the address it connects to)."""
    host, port = url_target(url)
    try:
        svc.webhook_guard.precheck(host, port)
    except InvalidRelay:
        raise ValidationError("invalid fields: url", fields={"url": [
            f"The host {host!r} is not a public address (loopback, private, link-local and "
            "other internal addresses are refused unless listed in "
            "POSTROOM_WEBHOOK_ALLOW_HOSTS)."]}) from None  # fmt: skip


@bp.post(ALL)
def create(sid: str) -> tuple[Response, int]:
    svc = _open(sid)
    data = load_or_raise(svc.schemas_webhooks.create, json_object())
    _check_url(svc, data["url"])
    if svc.webhooks.count(sid) >= MAX_ENDPOINTS:
        raise Conflict(f"a solution has at most {MAX_ENDPOINTS} webhook endpoints")
    record, secret = svc.webhooks.create(sid, data["url"], data["events"],
                                         data.get("description"))  # fmt: skip
    return jsonify({**view(record), "secret": secret}), 201


@bp.get(ALL)
def index(sid: str) -> Response:
    svc = _open(sid)
    return jsonify({"webhooks": [view(r) for r in svc.webhooks.all(sid)]})


@bp.get(ONE)
def show(sid: str, wid: str) -> Response:
    svc = _open(sid)
    record = _record(svc, sid, wid)
    return jsonify(view(record, pending=svc.webhooks.pending(sid, wid)))


@bp.patch(ONE)
def change(sid: str, wid: str) -> Response:
    svc = _open(sid)
    data = load_or_raise(svc.schemas_webhooks.patch, json_object())
    _record(svc, sid, wid)
    if "url" in data:
        _check_url(svc, data["url"])
    record = svc.webhooks.update(sid, wid, data)
    if record is None:
        raise NotFound(f"webhook {wid!r} not found")
    return jsonify(view(record, pending=svc.webhooks.pending(sid, wid)))


@bp.delete(ONE)
def delete(sid: str, wid: str) -> tuple[str, int]:
    svc = _open(sid)
    if not svc.webhooks.delete(sid, wid):
        raise NotFound(f"webhook {wid!r} not found")
    return "", 204


@bp.post(f"{ONE}/test")
def test(sid: str, wid: str) -> tuple[Response, int]:
    """Queue one ``webhook.test`` event for this endpoint (enabled or not); 202."""
    svc = _open(sid)
    record = _record(svc, sid, wid)
    data = {"webhook_id": wid, "solution_id": sid, "url": record["url"], "at": iso(time.time())}
    events.emit(svc.state, sid, [(events.WEBHOOK_TEST, data)], only=wid)
    return jsonify({"queued": True, "type": events.WEBHOOK_TEST}), 202


@bp.post(f"{ONE}/rotate-secret")
def rotate(sid: str, wid: str) -> Response:
    svc = _open(sid)
    secret = svc.webhooks.rotate(sid, wid)
    if secret is None:
        raise NotFound(f"webhook {wid!r} not found")
    return jsonify({"secret": secret})


@bp.get(f"{ONE}/deliveries")
def deliveries(sid: str, wid: str) -> Response:
    svc = _open(sid)
    _record(svc, sid, wid)
    return jsonify({"deliveries": svc.webhooks.deliveries(sid, wid)})
