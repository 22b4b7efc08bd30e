"""A solution's message templates (Jinja2, sandboxed: :mod:`postroom.api.templates.store`).

``PUT …/templates/{name}`` stores ``{subject, text?, html?}`` (201 new, 200 replaced; a
syntax error is a 400 naming the part), ``GET`` one or the list, ``DELETE`` one (204), and
``POST …/templates/{name}/render`` ``{data}`` previews ``{subject, text, html}`` without
sending (a render error is a 400 naming ``template_data``, as a send would get).
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify, request

from postroom.api.body import json_object
from postroom.api.services import Services, services
from postroom.api.templates.rendering import render_template
from postroom.api.templates.store import MAX_TEMPLATES
from postroom.shared.errors import Conflict, NotFound, ValidationError
from postroom.shared.schemas import load_or_raise
from postroom.shared.schemas.templates import TEMPLATE_NAME
from postroom.shared.schemas.validators import FullMatch
from postroom.shared.solutions import iso

bp = Blueprint("templates", __name__)

ONE = "/solutions/<sid>/templates/<name>"
_NAME = FullMatch(TEMPLATE_NAME, "")


def view(record: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": record["name"],
        "subject": record["subject"],
        "text": record.get("text"),
        "html": record.get("html"),
        "created_at": iso(record["created_at"]),
        "updated_at": iso(record["updated_at"]),
    }


def _open(sid: str, name: str | None = None) -> Services:
    svc = services()
    svc.authorize(sid)  # 401, then 404 for a solution that does not exist
    if name is not None and not _NAME.regex.fullmatch(name):
        raise NotFound(f"template {name[:64]!r} not found")
    return svc


def _get(svc: Services, sid: str, name: str) -> dict[str, Any]:
    record = svc.templates.get(sid, name)
    if record is None:
        raise NotFound(f"template {name!r} not found")
    return record


@bp.get("/solutions/<sid>/templates")
def index(sid: str) -> Response:
    svc = _open(sid)
    return jsonify({"templates": [view(t) for t in svc.templates.list(sid)]})


@bp.get(ONE)
def show(sid: str, name: str) -> Response:
    svc = _open(sid, name)
    return jsonify(view(_get(svc, sid, name)))


@bp.put(ONE)
def put(sid: str, name: str) -> tuple[Response, int]:
    svc = services()
    try:
        body = json_object()
    except ValidationError:
        svc.authorize(sid)
        raise
    svc = _open(sid)
    if not _NAME.regex.fullmatch(name):
        raise ValidationError("invalid template name", fields={"name": [
            "Must be 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or "
            "digit."]})  # fmt: skip
    data = load_or_raise(svc.schemas.template, body)
    if svc.templates.get(sid, name) is None and svc.templates.count(sid) >= MAX_TEMPLATES:
        raise Conflict(f"a solution keeps at most {MAX_TEMPLATES} templates; delete one first")
    record, created = svc.templates.put(sid, name, data)
    return jsonify(view(record)), 201 if created else 200


@bp.delete(ONE)
def delete(sid: str, name: str) -> tuple[str, int]:
    svc = _open(sid, name)
    if not svc.templates.delete(sid, name):
        raise NotFound(f"template {name!r} not found")
    return "", 204


@bp.post(ONE + "/render")
def render(sid: str, name: str) -> Response:
    svc = _open(sid, name)
    _get(svc, sid, name)
    body = json_object() if request.get_data(cache=True) else {}
    data = load_or_raise(svc.schemas.render, body)
    return jsonify(render_template(svc, sid, name, data.get("data") or {}).as_dict())
