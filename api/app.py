"""``create_app(settings)``: the intake API, built from settings and nothing else."""

from __future__ import annotations

from flask import Flask

from postroom.api import errors, metrics
from postroom.api.routes import (
    batch,
    email,
    health,
    openapi,
    quota,
    solutions,
    suppressions,
    tasks,
    templates,
    webhooks,
)
from postroom.api.services import Services
from postroom.shared.settings import Settings

API_PREFIX = tasks.PREFIX


def create_app(settings: Settings, services: Services | None = None) -> Flask:
    app = Flask("postroom")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.url_map.strict_slashes = False
    app.extensions["postroom"] = services or Services.build(settings)
    for module in (health, solutions, email, batch, tasks, quota, suppressions, templates,
                   webhooks, openapi):  # fmt: skip
        app.register_blueprint(module.bp, url_prefix=API_PREFIX)
    metrics.register(app)
    errors.register(app)
    return app
