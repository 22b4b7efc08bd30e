"""``GET /solutions/{sid}/tasks/{task_id}``: the task document; ``DELETE``: cancel it;
``GET /solutions/{sid}/tasks``: the solution's tasks, newest first
(:mod:`postroom.api.tasklist`)."""

from __future__ import annotations

import logging
from urllib.parse import quote

from flask import Blueprint, Response, jsonify, request

from postroom.api import tasklist
from postroom.api.auth import require_solution
from postroom.api.cancel import cancel_task
from postroom.api.services import services
from postroom.shared.documents import STATES
from postroom.shared.errors import NotFound, ValidationError
from postroom.shared.schemas import email_param

bp = Blueprint("tasks", __name__)
log = logging.getLogger("postroom.api")

#: where the blueprints are mounted (``postroom.api.app`` registers them there)
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
    (:mod:`postroom.api.cancel`)."""
    svc = services()
    require_solution(svc.principal(), sid)
    doc = cancel_task(svc.state, svc.results, svc.documents, sid, task_id)
    log.info("canceled", extra={"task_id": task_id, "solution_id": sid})
    return jsonify(doc)
LIST_LIMIT_MAX = 100
LIST_LIMIT_DEFAULT = 20
LIST_PARAMS = ("state", "recipient", "limit", "cursor")


@bp.get("/solutions/<sid>/tasks")
def index(sid: str) -> Response:
    """``?state=&recipient=&limit=&cursor=`` → ``{tasks, next_cursor}``."""
    svc = services()
    require_solution(svc.principal(), sid)
    args = request.args
    unknown = [name for name in args if name not in LIST_PARAMS]
    if unknown:
        raise ValidationError(f"invalid fields: {unknown[0]}", fields={
            name: ["Unknown query parameter."] for name in unknown})  # fmt: skip
    state = args.get("state")
    if state is not None and state not in STATES:
        raise ValidationError("invalid fields: state", fields={
            "state": [f"Must be one of {', '.join(STATES)}."]})  # fmt: skip
    recipient = args.get("recipient")
    if recipient is not None:
        recipient = email_param(recipient, field="recipient")
    raw_limit = args.get("limit", str(LIST_LIMIT_DEFAULT))
    if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= LIST_LIMIT_MAX:
        raise ValidationError("invalid fields: limit", fields={
            "limit": [f"Must be an integer from 1 to {LIST_LIMIT_MAX}."]})  # fmt: skip
    before = None
    cursor = args.get("cursor")
    if cursor is not None:
        before = tasklist.decode_cursor(cursor)
        if before is None:
            raise ValidationError("invalid fields: cursor", fields={
                "cursor": ["Not a cursor this list gave."]})  # fmt: skip
    found = tasklist.page(svc.results, sid, limit=int(raw_limit), state=state,
                          recipient=recipient, before=before)  # fmt: skip
    return jsonify({"tasks": found.tasks, "next_cursor": found.next_cursor})
