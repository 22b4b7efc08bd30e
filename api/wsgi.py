"""The WSGI entry point: ``gunicorn 'postroom.api.wsgi:app_from_env()'``."""

from __future__ import annotations

import os

from flask import Flask

from postroom.api.app import create_app
from postroom.shared.logs import configure_logging
from postroom.shared.settings import Settings


def app_from_env() -> Flask:
    settings = Settings.from_env(os.environ)
    configure_logging(settings)
    return create_app(settings)
