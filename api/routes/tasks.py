"""``GET /solutions/{sid}/tasks/{task_id}``: the task document."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify

from api.auth import require_solution
from api.services import services
from shared.errors import NotFound

bp = Blueprint("tasks", __name__)


@bp.get("/solutions/<sid>/tasks/<task_id>")
def show(sid: str, task_id: str) -> Response:
    svc = services()
    require_solution(svc.principal(), sid)
    doc = svc.documents.get(sid, task_id)
    if doc is None:
        raise NotFound(f"task {task_id!r} not found (unknown, or expired)")
    return jsonify(doc)
