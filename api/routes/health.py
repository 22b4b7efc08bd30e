"""Liveness and readiness: no authentication."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify
from redis.exceptions import RedisError

from postroom.api.services import services

bp = Blueprint("health", __name__)


@bp.get("/solution/health")
def health() -> Response:
    return Response("OK", status=200, mimetype="text/plain")


@bp.get("/solution/ready")
def ready() -> Response:
    svc = services()
    checks: dict[str, str] = {}
    try:
        svc.state.ping()
        checks["redis"] = "ok"
    except (RedisError, OSError):
        checks["redis"] = "unavailable"
    try:
        svc.results.ping()
        checks["result_backend"] = "ok"
    except (RedisError, OSError):
        checks["result_backend"] = "unavailable"
    checks["broker"] = "ok" if svc.enqueuer.ping() else "unavailable"
    ok = all(v == "ok" for v in checks.values())
    response = jsonify({"status": "ok" if ok else "unavailable", "checks": checks})
    response.status_code = 200 if ok else 503
    return response
