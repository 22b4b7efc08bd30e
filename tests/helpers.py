"""Building blocks the tests share: settings, an app, queue inspection."""

from __future__ import annotations

from typing import Any

import pytest
import redis
from flask.testing import FlaskClient
from redis.connection import Connection

from postroom.shared.crypto import generate_key
from postroom.shared.settings import Settings

ADMIN = "test-admin-token"
SECRET_KEY = generate_key()


def make_settings(redis_url: str, **overrides: Any) -> Settings:
    base: dict[str, Any] = {
        "redis_url": redis_url,
        "admin_token": ADMIN,
        "secret_key": SECRET_KEY,
        "default_sender_domain": "postroom.test",
        "log_format": "text",
        "smtp_timeout_s": 5.0,
        "retry_base_s": 0.2,
        "retry_max_delay_s": 1.0,
        "retry_max_attempts": 5,
        "retry_max_age_s": 60,
        # no worker metrics endpoint unless a test asks for one (several workers, one host)
        "worker_metrics_port": 0,
    }
    base.update(overrides)
    return Settings(**base)


def env_of(settings: Settings) -> dict[str, str]:
    """The ``POSTROOM_*`` environment that reproduces ``settings`` in a child process."""
    import dataclasses

    env: dict[str, str] = {}
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        if isinstance(value, tuple):
            value = ",".join(str(v) for v in value)
        elif isinstance(value, bool):
            value = "true" if value else "false"
        env[f"POSTROOM_{f.name.upper()}"] = str(value)
    return env


def as_bytes(reply: Any) -> bytes:
    """A Redis reply that must be bytes (the tests' clients do not decode), typed as such."""
    assert isinstance(reply, bytes), reply
    return reply


def all_bytes(replies: Any) -> list[bytes]:
    """A Redis reply that must be a list of bytes, typed as such."""
    return [as_bytes(r) for r in replies]


def queue_length(client: redis.Redis, queue: str = "email") -> int:
    return int(client.llen(queue))


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def create_solution(client: FlaskClient, sid: str = "acme", **config: Any) -> str:
    """Create solution ``sid`` through the API with the admin token; returns its token."""
    r = client.post("/api/v1/solutions", json={"solution_id": sid, **config},
                    headers=auth(ADMIN))  # fmt: skip
    assert 201 == r.status_code, r.get_json()
    token: str = r.get_json()["token"]
    return token


class RoundTrips:
    """Counts what the client writes to Redis sockets: one write is one round trip (a
    pipeline is written at once)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        original = Connection.send_packed_command

        def counting(conn: Connection, command: Any, check_health: bool = True) -> None:
            self.count += 1
            original(conn, command, check_health)

        monkeypatch.setattr(Connection, "send_packed_command", counting)
