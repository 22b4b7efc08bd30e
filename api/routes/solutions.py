"""Solutions and their configuration."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify

from postroom.api.auth import require_admin
from postroom.api.body import json_object
from postroom.api.services import services
from postroom.shared.errors import Forbidden
from postroom.shared.schemas import load_or_raise
from postroom.shared.solutions import Solution

bp = Blueprint("solutions", __name__)

# what only the admin may change: a solution cannot lift its own guard against misuse
ADMIN_ONLY_FIELDS = ("hLimit", "hLimit_policy")


@bp.post("/solutions")
def create() -> tuple[Response, int]:
    svc = services()
    require_admin(svc.principal())
    data = load_or_raise(svc.schemas.create, json_object())
    sid = data.pop("solution_id")
    svc.check_config_relay(data)
    token = svc.solutions.create(sid, data)
    solution = svc.solutions.get(sid)
    return jsonify({**solution.public(), "token": token}), 201


@bp.get("/solutions/<sid>")
def show(sid: str) -> Response:
    svc = services()
    _, solution = svc.authorize(sid)
    return jsonify(solution.public())


def _guard_admin_fields(current: Solution, new: dict[str, Any], is_admin: bool) -> None:
    if is_admin:
        return
    for name in ADMIN_ONLY_FIELDS:
        if name in new and new[name] != current.config.get(name):
            raise Forbidden(f"only the admin token may change {name}")


@bp.put("/solutions/<sid>/config")
def replace_config(sid: str) -> Response:
    svc = services()
    principal, current = svc.authorize(sid)
    body = json_object()
    data = load_or_raise(svc.schemas.config_put, body)
    if not principal.admin:
        for name in ADMIN_ONLY_FIELDS:  # a solution's PUT keeps what it may not change
            if name not in body:
                data[name] = current.config.get(name)
    _guard_admin_fields(current, data, principal.admin)
    svc.check_config_relay(data)
    return jsonify(svc.solutions.replace_config(sid, data).public())


@bp.patch("/solutions/<sid>/config")
def patch_config(sid: str) -> Response:
    svc = services()
    principal, current = svc.authorize(sid)
    data = load_or_raise(svc.schemas.config_patch, json_object())
    _guard_admin_fields(current, data, principal.admin)
    if any(name.startswith("connection_") for name in data):
        svc.check_config_relay({**current.config, **data})
    return jsonify(svc.solutions.patch_config(sid, data).public())
