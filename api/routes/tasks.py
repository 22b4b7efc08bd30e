"""``GET /solutions/{sid}/tasks/{task_id}``: the task document; ``DELETE``: cancel it."""

from __future__ import annotations

import logging
from urllib.parse import quote

from flask import Blueprint, Response, jsonify, request

from api.auth import require_solution
from api.services import services
from shared.cancel import cancel_task
from shared.errors import NotFound

bp = Blueprint("tasks", __name__)
log = logging.getLogger("postroom.api")

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


@bp.delete("/solutions/<sid>/tasks/<task_id>")
def cancel(sid: str, task_id: str) -> Response:
    """Cancel a ``scheduled`` task, or a ``queued`` one no worker has begun: 200 with the
    document, now ``canceled``; 409 ``Conflict`` once it is sending or final
    (:mod:`shared.cancel`)."""
    svc = services()
    require_solution(svc.principal(), sid)
    doc = cancel_task(svc.state, svc.results, svc.documents, sid, task_id)
    log.info("canceled", extra={"task_id": task_id, "solution_id": sid})
    return jsonify(doc)
