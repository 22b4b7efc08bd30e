"""``GET /openapi.json``: the spec, generated from the schemas that validate."""

from __future__ import annotations

from flask import Blueprint, Response, current_app, jsonify

from postroom.api.openapi.spec import build_spec
from postroom.api.services import services

bp = Blueprint("openapi", __name__)


@bp.get("/openapi.json")
def spec() -> Response:
    cached = current_app.extensions.get("postroom.spec")
    if cached is None:
        cached = current_app.extensions["postroom.spec"] = build_spec(services().settings)
    return jsonify(cached)
