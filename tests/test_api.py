"""The intake API against a real Redis (state and broker), without a worker."""

from __future__ import annotations

import json
from typing import Any

import pytest
import redis
from flask.testing import FlaskClient

from postroom.api.app import create_app
from tests.helpers import ADMIN, as_bytes, auth, make_settings, queue_length

SEND = "/api/v1/solutions/acme/email"


def send(client: FlaskClient, token: str, body: Any, **kw: Any) -> Any:
    return client.post(SEND, json=body, headers={**auth(token), **kw.pop("headers", {})}, **kw)


def test_health_is_plain_ok_without_auth(client: FlaskClient) -> None:
    """The seed's health check: 200, text/plain, body OK, no token needed."""
    r = client.get("/api/v1/solution/health")
    assert (r.status_code, r.mimetype, r.data) == (200, "text/plain", b"OK")


def test_ready_when_redis_and_broker_answer(client: FlaskClient) -> None:
    """Readiness checks Redis and the broker and says which."""
    r = client.get("/api/v1/solution/ready")
    assert r.status_code == 200
    assert r.get_json()["checks"] == {"redis": "ok", "result_backend": "ok", "broker": "ok"}


def test_ready_is_503_when_the_broker_is_down(real_redis: redis.Redis, redis_url: str) -> None:
    """A broker that does not answer makes the service not ready."""
    settings = make_settings(redis_url, broker_url="redis://127.0.0.1:1/0")
    r = create_app(settings).test_client().get("/api/v1/solution/ready")
    assert r.status_code == 503
    assert r.get_json()["checks"]["broker"] == "unavailable"


def test_missing_token_is_401_with_www_authenticate(client: FlaskClient) -> None:
    """No token: 401, the error body, and a Bearer challenge."""
    r = client.get("/api/v1/solutions/acme")
    assert r.status_code == 401
    assert r.headers["WWW-Authenticate"].startswith("Bearer")
    assert r.get_json()["type"] == "Unauthorized"


def test_invalid_token_is_401(client: FlaskClient, token: str) -> None:
    """A token nobody holds is refused."""
    r = client.get("/api/v1/solutions/acme", headers=auth("nope"))
    assert (r.status_code, r.get_json()["error"]) == (401, "invalid token")


def test_solution_token_on_admin_route_is_403(client: FlaskClient, token: str) -> None:
    """Creating solutions is the admin's."""
    r = client.post("/api/v1/solutions", json={"solution_id": "other"}, headers=auth(token))
    assert (r.status_code, r.get_json()["type"]) == (403, "Forbidden")


def test_another_solutions_resource_is_404(client: FlaskClient, token: str) -> None:
    """A solution cannot learn that another one exists."""
    client.post("/api/v1/solutions", json={"solution_id": "other"}, headers=auth(ADMIN))
    for path in ("/api/v1/solutions/other", "/api/v1/solutions/other/tasks/x"):
        r = client.get(path, headers=auth(token))
        assert r.status_code == 404, path
    r = client.post("/api/v1/solutions/other/email", json={"to": ["a@example.com"]},
                    headers=auth(token))
    assert r.status_code == 404


def test_create_twice_is_409(client: FlaskClient, token: str) -> None:
    """Solution ids are unique."""
    r = client.post("/api/v1/solutions", json={"solution_id": "acme"}, headers=auth(ADMIN))
    assert (r.status_code, r.get_json()["type"]) == (409, "Conflict")


def test_token_is_stored_only_as_a_hash(real_redis: redis.Redis, token: str) -> None:
    """Nothing in Redis holds the token itself."""
    for key in real_redis.scan_iter("postroom:*"):
        if real_redis.type(key) == b"string":
            assert token.encode() not in as_bytes(real_redis.get(key))


def test_config_password_is_sealed_and_never_shown(
    client: FlaskClient, token: str, real_redis: redis.Redis
) -> None:
    """The password is encrypted at rest and the API only says whether one is set."""
    body = {"connection_server": "smtp.example.com", "connection_user": "u",
            "connection_password": "s3cret-pw", "connection_port": 2525}
    r = client.put("/api/v1/solutions/acme/config", json=body, headers=auth(token))
    assert r.status_code == 200, r.get_json()
    config = r.get_json()["config"]
    assert config["connection_password_set"] is True
    assert "connection_password" not in config
    assert b"s3cret-pw" not in json.dumps(client.get(
        "/api/v1/solutions/acme", headers=auth(token)).get_json()).encode()
    for key in real_redis.scan_iter("postroom:*"):
        if real_redis.type(key) == b"string":
            assert b"s3cret-pw" not in as_bytes(real_redis.get(key))


def test_put_resets_omitted_fields_and_patch_null_clears(client: FlaskClient) -> None:
    """PUT replaces the whole configuration; PATCH changes fields and null clears one."""
    client.post("/api/v1/solutions", json={"solution_id": "acme"}, headers=auth(ADMIN))
    r = client.put("/api/v1/solutions/acme/config",
                   json={"connection_server": "smtp.example.com", "hLimit": 5},
                   headers=auth(ADMIN))
    assert r.get_json()["config"]["hLimit"] == 5
    r = client.put("/api/v1/solutions/acme/config", json={}, headers=auth(ADMIN))
    assert r.get_json()["config"]["connection_server"] is None
    assert r.get_json()["config"]["hLimit"] == 10
    r = client.patch("/api/v1/solutions/acme/config", json={"hLimit": 3}, headers=auth(ADMIN))
    assert r.get_json()["config"]["hLimit"] == 3
    r = client.patch("/api/v1/solutions/acme/config", json={"hLimit": None},
                     headers=auth(ADMIN))
    assert r.get_json()["config"]["hLimit"] == 10


def test_a_solution_cannot_raise_its_own_hlimit(client: FlaskClient, token: str) -> None:
    """hLimit guards against a solution's misuse, so only the admin changes it."""
    r = client.patch("/api/v1/solutions/acme/config", json={"hLimit": 1000},
                     headers=auth(token))
    assert (r.status_code, r.get_json()["type"]) == (403, "Forbidden")
    r = client.put("/api/v1/solutions/acme/config", json={}, headers=auth(token))
    assert r.status_code == 200
    assert r.get_json()["config"]["hLimit"] == 10


def test_send_answers_202_with_location_and_enqueues_one(
    client: FlaskClient, token: str, real_redis: redis.Redis
) -> None:
    """A valid send is queued at once: 202, task id, Location, one broker message."""
    before = queue_length(real_redis)
    r = send(client, token, {"to": ["Someone@Example.com"], "subject": "Hi", "text": "x"})
    assert r.status_code == 202, r.get_json()
    body = r.get_json()
    assert body["state"] == "queued"
    assert r.headers["Location"] == body["links"]["self"]
    assert body["links"]["self"] == f"/api/v1/solutions/acme/tasks/{body['task_id']}"
    assert queue_length(real_redis) == before + 1
    doc = client.get(body["links"]["self"], headers=auth(token)).get_json()
    assert (doc["state"], doc["attempts"], doc["result"]) == ("queued", 0, None)


@pytest.mark.parametrize("sid, task_id", [("acme", "0f1e-2d3c"), ("a_b-9", "x y?z#%")])
def test_task_links_are_what_url_for_gives(redis_url: str, sid: str, task_id: str) -> None:
    """The 202's link is written directly, and is what Flask's ``url_for`` would build,
    under a mount point (``SCRIPT_NAME``) too."""
    from flask import url_for

    from postroom.api.routes import tasks

    app = create_app(make_settings(redis_url))
    for base in ("http://h/", "http://h/mounted/here/"):
        with app.test_request_context("/", base_url=base):
            assert url_for("tasks.show", sid=sid, task_id=task_id) == tasks.link(sid, task_id)


def test_the_202_answer_is_json_with_rate_limit_headers(client: FlaskClient, token: str) -> None:
    """The accepted answer's media type, body and headers, byte for byte as JSON."""
    r = send(client, token, {"to": ["a@example.com"], "text": "x"})
    assert (202, "application/json") == (r.status_code, r.mimetype)
    body = json.loads(r.data)
    assert ["task_id", "state", "links"] == list(body)
    assert r.data.endswith(b"\n")
    assert {"RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset", "RateLimit-Policy",
            "Location"} <= set(r.headers.keys())  # fmt: skip


def test_the_broker_message_is_json_without_secrets(
    client: FlaskClient, token: str, real_redis: redis.Redis
) -> None:
    """Jobs travel as JSON; a caller's relay password travels sealed, never in clear."""
    client.put("/api/v1/solutions/acme/config", json={}, headers=auth(ADMIN))
    r = send(client, token, {
        "to": ["a@example.com"], "text": "x",
        "connection": {"server": "smtp.example.com", "user": "me@example.com",
                       "password": "hunter2-pw", "port": 587},
    })
    assert r.status_code == 202, r.get_json()
    raw = as_bytes(real_redis.lindex("email", 0))
    envelope = json.loads(raw)
    assert envelope["content-type"] == "application/json"
    assert b"hunter2-pw" not in raw
    assert "hunter2" not in json.dumps(envelope["headers"])


def test_invalid_body_is_400_naming_the_field_and_enqueues_nothing(
    client: FlaskClient, token: str, real_redis: redis.Redis
) -> None:
    """A validation error names the field and nothing reaches the broker."""
    before = queue_length(real_redis)
    r = send(client, token, {"to": ["not-an-address"], "text": "x"})
    assert r.status_code == 400
    body = r.get_json()
    assert (body["type"], body["status"]) == ("ValidationError", 400)
    assert "to" in body["fields"]
    assert queue_length(real_redis) == before


def test_from_without_own_relay_is_400(client: FlaskClient, token: str) -> None:
    """On the default relay the sender is the service's; ``from`` is refused."""
    r = send(client, token, {"to": ["a@example.com"], "from": "me@example.com", "text": "x"})
    assert r.status_code == 400
    assert "from" in r.get_json()["fields"]


def test_wrong_content_type_is_415(client: FlaskClient, token: str) -> None:
    """Only application/json bodies are read."""
    r = client.post(SEND, data="to=a@example.com", headers=auth(token),
                    content_type="application/x-www-form-urlencoded")
    assert (r.status_code, r.get_json()["type"]) == (415, "UnsupportedMediaType")


def test_body_over_the_limit_is_413(real_redis: redis.Redis, redis_url: str) -> None:
    """The size limit is judged from Content-Length before the body is read."""
    app = create_app(make_settings(redis_url, max_body_bytes=1000))
    c = app.test_client()
    tok = c.post("/api/v1/solutions", json={"solution_id": "acme"},
                 headers=auth(ADMIN)).get_json()["token"]
    r = c.post(SEND, json={"to": ["a@example.com"], "text": "x" * 2000}, headers=auth(tok))
    assert (r.status_code, r.get_json()["type"]) == (413, "PayloadTooLarge")


@pytest.mark.parametrize(
    "raw, message",
    [
        (b"[1, 2]", "must be a JSON object"),
        (b'{"to": NaN}', "not valid JSON"),
        (b"\xff\xfe{}", "not valid UTF-8"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'{"to": ["a@example.com"]', "not valid JSON"),
    ],
)
def test_malformed_json_is_a_clear_400(
    client: FlaskClient, token: str, raw: bytes, message: str
) -> None:
    """Bodies that are not a JSON object get a 400 that says why, never a 500."""
    r = client.post(SEND, data=raw, headers=auth(token), content_type="application/json")
    assert r.status_code == 400
    assert message in r.get_json()["error"]


def test_nesting_is_judged_whatever_the_brackets_inside_strings(
    client: FlaskClient, token: str
) -> None:
    """A body nested past 32 levels is a 400; brackets inside strings neither trip the
    check nor hide a real nesting from it."""
    deep: dict[str, object] = {"to": ["a@example.com"], "text": "x", "extra": None}
    inner: object = 1
    for _ in range(33):
        inner = [inner]
    deep["extra"] = inner
    r = client.post(SEND, json=deep, headers=auth(token))
    assert (r.status_code, "nested too deeply" in r.get_json()["error"]) == (400, True)

    brackets = {"to": ["a@example.com"], "subject": "[" * 40, "text": "{" * 40}
    r = client.post(SEND, json=brackets, headers=auth(token))
    assert r.status_code == 202, r.get_json()


def test_unknown_task_is_404(client: FlaskClient, token: str) -> None:
    """An id that was never issued is 404, not a pending task."""
    r = client.get("/api/v1/solutions/acme/tasks/0f1e2d3c", headers=auth(token))
    assert (r.status_code, r.get_json()["type"]) == (404, "NotFound")


def test_broker_down_is_503_and_nothing_is_accepted(
    real_redis: redis.Redis, redis_url: str
) -> None:
    """With the broker unreachable the caller is told to retry and no task exists."""
    app = create_app(make_settings(redis_url, broker_url="redis://127.0.0.1:1/0"))
    c = app.test_client()
    tok = c.post("/api/v1/solutions", json={"solution_id": "acme"},
                 headers=auth(ADMIN)).get_json()["token"]
    r = c.post(SEND, json={"to": ["a@example.com"], "text": "x"}, headers=auth(tok))
    assert (r.status_code, r.get_json()["type"]) == (503, "ServiceUnavailable")
    assert list(real_redis.scan_iter("postroom:*:task:*")) == []


def test_idempotency_key_replays_and_refuses_another_body(
    client: FlaskClient, token: str, real_redis: redis.Redis
) -> None:
    """The same key and body is the same 202; the same key with another body is 422."""
    before = queue_length(real_redis)
    body = {"to": ["a@example.com"], "text": "x"}
    first = send(client, token, body, headers={"Idempotency-Key": "k1"})
    again = send(client, token, body, headers={"Idempotency-Key": "k1"})
    assert first.status_code == again.status_code == 202
    assert first.get_json() == again.get_json()
    assert queue_length(real_redis) == before + 1
    other = send(client, token, {**body, "text": "y"}, headers={"Idempotency-Key": "k1"})
    assert (other.status_code, other.get_json()["type"]) == (422, "IdempotencyMismatch")


def test_wait_out_of_range_is_400(client: FlaskClient, token: str) -> None:
    """``?wait`` takes 1 to 30 seconds."""
    r = client.post(SEND + "?wait=31", json={"to": ["a@example.com"]}, headers=auth(token))
    assert r.status_code == 400
    assert "wait" in r.get_json()["fields"]


def test_every_error_has_the_one_body(client: FlaskClient) -> None:
    """Unknown routes and methods answer the same error body as everything else."""
    for r in (client.get("/api/v1/nope"), client.delete("/api/v1/solution/health")):
        body = r.get_json()
        assert set(body) == {"type", "error", "status"}
        assert body["status"] == r.status_code


def test_metrics_are_prometheus_text(
    client: FlaskClient, token: str, real_redis: redis.Redis
) -> None:
    """``/metrics`` (no auth) counts requests and reads the queue depth from Redis, so
    every API process reports the same service-wide backlog."""
    send(client, token, {"to": ["a@example.com"], "text": "x"})
    r = client.get("/metrics")
    assert (r.status_code, r.mimetype) == (200, "text/plain")
    text = r.get_data(as_text=True)
    assert f"postroom_queue_depth {float(queue_length(real_redis))}" in text
    assert 'postroom_http_requests_total{method="POST",' in text
    assert 'status="202"} 1.0' in text
