"""Secrets: SMTP passwords travel sealed and are never written in clear anywhere a send
leaves traces; tokens are kept hashed, and a rotated token stops working at once."""

from __future__ import annotations

import base64
import json
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from postroom.api.app import create_app
from postroom.cli import main as cli_main
from postroom.shared.relays import Relay
from postroom.shared.settings import Settings
from postroom.worker.app import make_celery
from tests.e2e import Stack
from tests.helpers import ADMIN, SECRET_KEY, all_bytes, as_bytes, auth, make_settings
from tests.smtp_server import ScriptedSmtpServer
from tests.stack import wait_for

REQUEST_PW = "req-Pa55word-7f3a91"  # a caller's relay password, given in the request
WRONG_PW = "wrong-Pa55word-c0ffee"  # a password the relay refuses
CONFIG_PW = "cfg-Pa55word-5e1d2b"  # a solution's stored relay password


def forms(user: str, password: str) -> list[bytes]:
    """Every spelling of a password worth looking for: as is, base64 (AUTH LOGIN), and
    the base64 AUTH PLAIN string."""
    plain = f"\0{user}\0{password}".encode()
    return [
        password.encode(),
        base64.b64encode(password.encode()),
        base64.b64encode(plain),
        base64.b64encode(plain).rstrip(b"="),
    ]


def readable(value: bytes) -> list[bytes]:
    """``value`` and, when it is a kombu message (or holds one), its decoded body."""
    out = [value]

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            properties = node.get("properties")
            encoding = (properties if isinstance(properties, dict) else node).get("body_encoding")
            if encoding == "base64" and isinstance(node.get("body"), str):
                out.append(base64.b64decode(node["body"]))
            for child in node.values():
                walk(child)
        elif isinstance(node, list):
            for child in node:
                walk(child)

    try:
        walk(json.loads(value))
    except (ValueError, UnicodeDecodeError):
        pass
    return out


def everything_in(client: redis.Redis) -> list[bytes]:
    """Every key name and value of the database, lists, hashes, sets and sorted sets
    included, kombu message bodies decoded."""
    blobs: list[bytes] = []
    for key in client.scan_iter(count=1000):
        blobs.append(key)
        kind = client.type(key)
        if kind == b"string":
            values = [as_bytes(client.get(key) or b"")]
        elif kind == b"list":
            values = all_bytes(client.lrange(key, 0, -1))
        elif kind == b"hash":
            values = all_bytes(b for pair in dict(client.hgetall(key)).items() for b in pair)
        elif kind == b"set":
            values = all_bytes(client.smembers(key))
        elif kind == b"zset":
            values = all_bytes(client.zrange(key, 0, -1))
        else:
            raise AssertionError(f"no reader for {key!r} of type {kind!r}")
        for value in values:
            blobs.extend(readable(value))
    return blobs


def leaks(blobs: list[bytes], needles: list[bytes]) -> list[bytes]:
    return [n for n in needles if any(n in blob for blob in blobs)]


@pytest.mark.slow
def test_a_send_leaves_no_password_behind(
    real_redis: redis.Redis,
    make_smtp_server: Callable[..., ScriptedSmtpServer],
    loopback_stack: Callable[..., Stack],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Three sends with passwords through a real worker — a request's relay (once
    retried), the same relay with a wrong password (AUTH fails), a solution's stored
    relay — and not one spelling of a password is in the queued broker messages, the
    schedule, any Redis key or value afterwards, the task documents, the API's log or
    the worker's log."""
    caplog.set_level(logging.DEBUG)
    relay = make_smtp_server(auth=("relay-user", REQUEST_PW))
    cfg_relay = make_smtp_server(auth=("cfg-user", CONFIG_PW))
    relay.script.data_replies.append("451 4.3.0 try again")
    stack = loopback_stack()
    stack.solution("acme")
    stack.solution("cfg", connection_server="127.0.0.1", connection_port=cfg_relay.port,
                   connection_scheme="", connection_user="cfg-user",
                   connection_password=CONFIG_PW)
    needles = [
        *forms("relay-user", REQUEST_PW), *forms("relay-user", WRONG_PW),
        *forms("cfg-user", CONFIG_PW),
    ]

    def through_relay(password: str) -> dict[str, Any]:
        return {"to": ["ann@example.com"], "from": "me@example.org", "text": "x",
                "connection": {"server": "127.0.0.1", "port": relay.port, "scheme": "",
                               "user": "relay-user", "password": password}}

    try:
        ids = {
            "retried": stack.send(through_relay(REQUEST_PW)).get_json()["task_id"],
            "auth failed": stack.send(through_relay(WRONG_PW)).get_json()["task_id"],
            "stored": stack.send({"to": ["bob@example.com"], "text": "x"},
                                 sid="cfg").get_json()["task_id"],
        }
        queued = all_bytes(real_redis.lrange("email", 0, -1))
        bodies = [readable(raw)[1] for raw in queued]
        # the jobs are there, decoded, each carrying its relay's password sealed (Fernet)
        passwords = [json.loads(body)[1]["job"]["relay"]["password"] for body in bodies]
        assert [True] * 3 == [p.startswith("gAAAAA") for p in passwords]
        assert [] == leaks([*queued, *bodies], needles)
        headers = [json.loads(raw)["headers"] for raw in queued]
        assert {"()"} == {h["argsrepr"] for h in headers}
        assert set(ids.values()) == {eval(h["kwargsrepr"])["task_id"] for h in headers}

        stack.start_worker(log_level="DEBUG", retry_base_s=1.5, retry_max_delay_s=3.0)
        wait_for(lambda: stack.task(ids["retried"])["state"] == "retrying", 15, 0.02,
                 "the first send to be retrying")
        scheduled = all_bytes(real_redis.zrange("postroom:schedule", 0, -1))
        assert [True] == [b'"password":"gAAAAA' in job for job in scheduled]
        assert [] == leaks(scheduled, needles)

        docs = {name: stack.wait_final(task_id, sid="cfg" if name == "stored" else "acme")
                for name, task_id in ids.items()}
        assert {"retried": "sent", "auth failed": "failed", "stored": "sent"} == {
            name: doc["state"] for name, doc in docs.items()}
        assert "SmtpAuthFailed" == docs["auth failed"]["error"]["type"]
        # good logins for the retried send (two, or one when the retry runs in the pool
        # process that kept the connection), failed ones (smtplib tries each mechanism)
        good = sum(ok for _, ok in relay.logins)
        assert (True, True) == (good in (1, 2), any(not ok for _, ok in relay.logins))
        assert [("cfg-user", True)] == cfg_relay.logins
    finally:
        stack.stop()

    answers = [json.dumps(doc).encode() for doc in docs.values()]
    answers.append(json.dumps(stack.client.get(
        "/api/v1/solutions/cfg", headers=auth(ADMIN)).get_json()).encode())
    # what this process logged, but for the test relays' own protocol traces (mail.log)
    api_log = "\n".join(
        r.getMessage() + repr(r.__dict__) for r in caplog.records
        if not r.name.startswith("mail.log")
    ).encode()
    worker_log = stack.logs()
    assert b"sending" in worker_log  # the worker's log was captured
    assert [] == leaks(everything_in(real_redis), needles)
    assert [] == leaks(answers, needles)
    assert [] == leaks([api_log, worker_log], needles)


def test_results_are_not_extended_and_secrets_have_no_repr() -> None:
    """Celery keeps no extended results (which would copy the job's arguments), and
    neither the settings nor a relay print their secrets."""
    settings = Settings(admin_token="admin-tok-123", secret_key=SECRET_KEY,
                        default_smtp_url="smtp://u:url-pw-456@relay.example:587")
    app = make_celery(settings)
    assert (False, True) == (app.conf.result_extended, app.conf.task_ignore_result)
    assert ["json"] == list(app.conf.accept_content)
    shown = repr(settings) + repr(Relay("relay.example", 587, user="u", password="relay-pw-789"))
    for secret in ("admin-tok-123", SECRET_KEY, "url-pw-456", "relay-pw-789"):
        assert secret not in shown


@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch, redis_url: str) -> None:
    for name in list(os.environ):
        if name.startswith("POSTROOM_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("POSTROOM_REDIS_URL", redis_url)
    monkeypatch.setenv("POSTROOM_SECRET_KEY", SECRET_KEY)


def test_rotate_token_stops_the_old_token_over_http(
    real_redis: redis.Redis, redis_url: str, cli_env: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """After ``postroom solution rotate-token`` the old token is a 401 at once and the
    printed one works; Redis holds neither token, only their hashes."""
    client = create_app(make_settings(redis_url)).test_client()
    old = client.post("/api/v1/solutions", json={"solution_id": "acme"},
                      headers=auth(ADMIN)).get_json()["token"]
    assert 200 == client.get("/api/v1/solutions/acme", headers=auth(old)).status_code
    assert 0 == cli_main(["solution", "rotate-token", "acme"])
    new = capsys.readouterr().out.strip()
    r = client.get("/api/v1/solutions/acme", headers=auth(old))
    assert (401, "Unauthorized") == (r.status_code, r.get_json()["type"])
    assert 200 == client.get("/api/v1/solutions/acme", headers=auth(new)).status_code
    assert [] == leaks(everything_in(real_redis), [old.encode(), new.encode()])


@pytest.fixture
def client_and_token(real_redis: redis.Redis, redis_url: str) -> Iterator[tuple[Any, str]]:
    client = create_app(make_settings(redis_url)).test_client()
    token = client.post("/api/v1/solutions", json={"solution_id": "acme"},
                        headers=auth(ADMIN)).get_json()["token"]
    yield client, token


def test_a_token_that_differs_in_its_last_character_is_refused(
    client_and_token: tuple[Any, str],
) -> None:
    """Tokens compare whole: the right prefix, or the admin token with one character
    changed, is a 401."""
    client, token = client_and_token
    for wrong in (token[:-1] + ("a" if token[-1] != "a" else "b"), token[:-1], ADMIN[:-1] + "X"):
        r = client.get("/api/v1/solutions/acme", headers=auth(wrong))
        assert 401 == r.status_code, wrong
