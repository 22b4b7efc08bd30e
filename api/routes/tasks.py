"""``GET /solutions/{sid}/tasks/{task_id}``: the task document."""

from __future__ import annotations

from urllib.parse import quote

from flask import Blueprint, Response, jsonify, request

from api.auth import require_solution
from api.services import services
from shared.errors import NotFound

bp = Blueprint("tasks", __name__)

#: where the blueprints are mounted (``api.app`` registers them there)
PREFIX = "/api/v1"


def link(sid: str, task_id: str) -> str:
    """The path of a task's document, as ``url_for("tasks.show", ...)`` gives it, written
    directly: it is in the answer to every accepted send."""
    sid, task_id = quote(sid, safe=""), quote(task_id, safe="")
    return f"{request.script_root}{PREFIX}/solutions/{sid}/tasks/{task_id}"


@bp.get("/solutions/<sid>/tasks/<task_id>")
def show(sid: str, task_id: str) -> Response:
    svc = services()
    require_solution(svc.principal(), sid)
    doc = svc.documents.get(sid, task_id)
    if doc is None:
        raise NotFound(f"task {task_id!r} not found (unknown, or expired)")
    return jsonify(doc)
