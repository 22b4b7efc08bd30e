"""Templates, attachments, scheduled sends and cancel through the intake API, against a
real Redis (state and broker), without a worker."""

from __future__ import annotations

import base64
import json
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis
from flask.testing import FlaskClient

from postroom.shared import keys
from postroom.shared.settings import Settings
from tests.helpers import ADMIN, auth, queue_length

SEND = "/api/v1/solutions/acme/email"
TEMPLATES = "/api/v1/solutions/acme/templates"
BLOB = bytes(range(256)) * 400  # 100 KiB


def send(client: FlaskClient, token: str, body: Any) -> Any:
    return client.post(SEND, json=body, headers=auth(token))


def later(seconds: float) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat()


def queued_job(real_redis: redis.Redis) -> tuple[bytes, dict[str, Any]]:
    raw = real_redis.lindex("email", 0)
    assert isinstance(raw, bytes)
    body = json.loads(base64.b64decode(json.loads(raw)["body"]))
    return raw, body[1]["job"]


# -- templates -------------------------------------------------------------------------


def test_templates_are_stored_listed_shown_and_deleted(client: FlaskClient, token: str) -> None:
    """PUT creates (201) then replaces (200); GET shows one and lists all; DELETE is 204,
    then 404."""
    body = {"subject": "Hi {{ name }}", "text": "Hello {{ name }}", "html": "<p>{{ name }}</p>"}
    r = client.put(f"{TEMPLATES}/welcome", json=body, headers=auth(token))
    assert 201 == r.status_code, r.get_json()
    assert {**body, "name": "welcome"} == {k: r.get_json()[k] for k in (*body, "name")}
    r = client.put(f"{TEMPLATES}/welcome", json={**body, "html": None}, headers=auth(token))
    assert (200, None) == (r.status_code, r.get_json()["html"])
    assert ["welcome"] == [t["name"] for t in client.get(TEMPLATES, headers=auth(token))
                           .get_json()["templates"]]
    assert 200 == client.get(f"{TEMPLATES}/welcome", headers=auth(token)).status_code
    assert 204 == client.delete(f"{TEMPLATES}/welcome", headers=auth(token)).status_code
    assert 404 == client.get(f"{TEMPLATES}/welcome", headers=auth(token)).status_code
    assert 404 == client.delete(f"{TEMPLATES}/welcome", headers=auth(token)).status_code


def test_another_solutions_templates_are_404(client: FlaskClient, token: str) -> None:
    """A solution's token cannot read another solution's templates."""
    r = client.post("/api/v1/solutions", json={"solution_id": "other"}, headers=auth(ADMIN))
    other = r.get_json()["token"]
    client.put(f"{TEMPLATES}/t", json={"subject": "s", "text": "t"}, headers=auth(token))
    assert 404 == client.get(f"{TEMPLATES}/t", headers=auth(other)).status_code
    assert 401 == client.get(f"{TEMPLATES}/t").status_code


def test_render_previews_with_html_autoescaped_and_text_not(
    client: FlaskClient, token: str, real_redis: redis.Redis
) -> None:
    """``render`` answers subject, text and html; HTML escapes the data, text does not;
    nothing is queued."""
    client.put(f"{TEMPLATES}/welcome", json={"subject": "Hi {{ name }}", "text": "T {{ name }}",
               "html": "<p>{{ name }}</p>"}, headers=auth(token))  # fmt: skip
    r = client.post(f"{TEMPLATES}/welcome/render", json={"data": {"name": "<b>Ann</b>"}},
                    headers=auth(token))
    assert {"subject": "Hi <b>Ann</b>", "text": "T <b>Ann</b>",
            "html": "<p>&lt;b&gt;Ann&lt;/b&gt;</p>"} == r.get_json()  # fmt: skip
    assert 0 == queue_length(real_redis)


@pytest.mark.parametrize("source", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os }}",
    "{{ self._TemplateReference__context }}",
    "{{ [].append(1) }}",
    # big values out of small ones: refused before they are made
    "{{ 'x' * 100000000 }}",
    "{{ 10 ** 100000 }}",
    "{{ 'x'|center(1000000000) }}",
    "{{ 'x'.ljust(1000000000) }}",
    "{{ '{:>1000000000}'.format(1) }}",
    "{{ '%1000000000s' % 1 }}",
    "{% set a = 'x' * 100000 %}{{ [" + "a, " * 21 + "] }}",
    "{% set a = 'x' * 100000 %}" + "{% set a = a ~ a %}" * 30 + "{{ a }}",
    "{{ range(10000)|list|join('x' * 10000) }}",
    # a loop that runs long without making anything: stopped by the clock
    "{% for a in range(10000) %}{% for b in range(10000) %}{% endfor %}{% endfor %}",
])  # fmt: skip
def test_sandbox_escapes_and_runaway_templates_are_refused(
    client: FlaskClient, token: str, source: str
) -> None:
    """Reaching Python internals, mutating data, huge outputs and endless loops end the
    render with a 400 naming ``template_data``: nothing of the host leaks."""
    assert 201 == client.put(f"{TEMPLATES}/bad", json={"subject": "s", "text": source},
                             headers=auth(token)).status_code
    started = time.monotonic()
    r = client.post(f"{TEMPLATES}/bad/render", json={"data": {}}, headers=auth(token))
    assert (400, ["template_data"]) == (r.status_code, list(r.get_json()["fields"]))
    assert time.monotonic() - started < 3


def test_a_template_send_queues_the_rendered_message(
    client: FlaskClient, token: str, real_redis: redis.Redis
) -> None:
    """A send naming a template carries the rendered subject, text and html in its job."""
    client.put(f"{TEMPLATES}/welcome", json={"subject": "Hi {{ name }}", "text": "T {{ n }}",
               "html": "<i>{{ name }}</i>"}, headers=auth(token))  # fmt: skip
    r = send(client, token, {"to": ["a@example.com"], "template": "welcome",
                             "template_data": {"name": "Ann & Bob", "n": 3}})
    assert 202 == r.status_code, r.get_json()
    _, job = queued_job(real_redis)
    assert ("Hi Ann & Bob", "T 3", "<i>Ann &amp; Bob</i>") == (
        job["message"]["subject"], job["message"]["text"], job["message"]["html"])


# -- attachments, reply_to, headers -----------------------------------------------------


def test_attachment_bytes_are_stored_apart_from_the_broker_message(
    client: FlaskClient, token: str, real_redis: redis.Redis, settings: Settings
) -> None:
    """The job names each attachment (name, type, Content-ID, size); its bytes are in
    Redis once, with the document's time to live, never in the broker message."""
    r = send(client, token, {
        "to": ["a@example.com"], "html": '<img src="cid:logo">', "reply_to": ["r@example.com"],
        "headers": {"X-Campaign": "c1"},
        "attachments": [
            {"filename": "report.bin", "content": base64.b64encode(BLOB).decode()},
            {"filename": "logo.png", "content": base64.b64encode(b"png").decode(),
             "content_id": "logo"}]})  # fmt: skip
    assert 202 == r.status_code, r.get_json()
    raw, job = queued_job(real_redis)
    assert len(raw) < 4000
    assert [{"filename": "report.bin", "content_type": "application/octet-stream",
             "content_id": None, "size": len(BLOB)},
            {"filename": "logo.png", "content_type": "image/png", "content_id": "logo",
             "size": 3}] == job["attachments"]  # fmt: skip
    assert (["r@example.com"], {"X-Campaign": "c1"}) == (job["message"]["reply_to"],
                                                         job["message"]["headers"])
    key = keys.attachments("acme", job["task_id"])
    assert {b"0": BLOB, b"1": b"png"} == real_redis.hgetall(key)
    assert settings.result_ttl - 5 < real_redis.ttl(key) <= settings.result_ttl


def test_a_plain_send_job_has_no_new_keys(
    client: FlaskClient, token: str, real_redis: redis.Redis
) -> None:
    """A send without the new fields queues the job it always did."""
    send(client, token, {"to": ["a@example.com"], "text": "x"})
    _, job = queued_job(real_redis)
    assert {"from", "to", "cc", "bcc", "subject", "text", "html"} == set(job["message"])
    assert "attachments" not in job and "send_at" not in job


# -- scheduled sends and cancel ---------------------------------------------------------


def test_a_scheduled_send_waits_in_the_schedule(
    client: FlaskClient, token: str, real_redis: redis.Redis, settings: Settings
) -> None:
    """``send_at`` ahead: 202 ``scheduled``, nothing on the queue, the job in the schedule
    at its time, the document ``scheduled`` with ``next_attempt_at``, kept past its time."""
    due = time.time() + 3600
    r = send(client, token, {"to": ["a@example.com"], "text": "x",
                             "send_at": datetime.fromtimestamp(due, UTC).isoformat()})
    assert (202, "scheduled") == (r.status_code, r.get_json()["state"]), r.get_json()
    assert 0 == queue_length(real_redis)
    entries: Any = real_redis.zrange(keys.schedule(), 0, -1, withscores=True)
    [score] = [float(entry[1]) for entry in entries]
    assert abs(score - due) < 0.01
    task_id = r.get_json()["task_id"]
    doc = client.get(r.get_json()["links"]["self"], headers=auth(token)).get_json()
    assert ("scheduled", datetime.fromtimestamp(due, UTC).isoformat()[:19]) == (
        doc["state"], doc["next_attempt_at"][:19])
    assert real_redis.ttl(keys.task("acme", task_id)) > settings.result_ttl + 3500


def test_a_send_at_in_the_past_is_sent_now(
    client: FlaskClient, token: str, real_redis: redis.Redis
) -> None:
    """A ``send_at`` already past is now: queued at once."""
    r = send(client, token, {"to": ["a@example.com"], "text": "x", "send_at": later(-60)})
    assert (202, "queued", 1) == (r.status_code, r.get_json()["state"],
                                  queue_length(real_redis))


def test_the_intake_peek_ignores_scheduled_sends(client: FlaskClient, token: str) -> None:
    """With the bucket empty now, a send now is 429 but a send later is accepted: its token
    is taken when it is sent."""
    client.patch("/api/v1/solutions/acme/config", json={"hLimit": 1}, headers=auth(ADMIN))
    assert 202 == send(client, token, {"to": ["a@example.com"], "text": "x"}).status_code
    # the worker has not taken the token; take it as the worker would
    from postroom.shared.ratelimit import TokenBucket

    bucket = TokenBucket(redis.Redis.from_url(client.application.extensions["postroom"]
                                              .settings.redis_url), 3600)
    assert bucket.take("acme", 1, None).allowed
    assert 429 == send(client, token, {"to": ["a@example.com"], "text": "x"}).status_code
    r = send(client, token, {"to": ["a@example.com"], "text": "x", "send_at": later(600)})
    assert (202, "scheduled") == (r.status_code, r.get_json()["state"]), r.get_json()


def test_cancel_a_scheduled_task(
    client: FlaskClient, token: str, real_redis: redis.Redis
) -> None:
    """DELETE cancels a scheduled task: 200 with the document ``canceled`` (final), its
    attachments deleted; a second DELETE is 409 ``Conflict``."""
    r = send(client, token, {"to": ["a@example.com"], "text": "x", "send_at": later(600),
                             "attachments": [{"filename": "a.txt", "content": "YWJj"}]})
    link, task_id = r.get_json()["links"]["self"], r.get_json()["task_id"]
    assert real_redis.exists(keys.attachments("acme", task_id))
    r = client.delete(link, headers=auth(token))
    assert (200, "canceled", None) == (r.status_code, r.get_json()["state"],
                                       r.get_json()["next_attempt_at"])
    assert "canceled" == client.get(link, headers=auth(token)).get_json()["state"]
    assert not real_redis.exists(keys.attachments("acme", task_id))
    r = client.delete(link, headers=auth(token))
    assert (409, "Conflict", "canceled") == (r.status_code, r.get_json()["type"],
                                             r.get_json()["state"])


def test_cancel_a_queued_task_no_worker_has_begun(client: FlaskClient, token: str) -> None:
    """A queued task that no worker holds can be canceled too."""
    r = send(client, token, {"to": ["a@example.com"], "text": "x"})
    assert "canceled" == client.delete(r.get_json()["links"]["self"],
                                       headers=auth(token)).get_json()["state"]


def test_cancel_is_409_once_a_worker_holds_the_task(
    client: FlaskClient, token: str, real_redis: redis.Redis
) -> None:
    """A task whose lease a worker holds (it is sending) is 409, and stays as it was."""
    r = send(client, token, {"to": ["a@example.com"], "text": "x"})
    task_id = r.get_json()["task_id"]
    real_redis.set(keys.lease("acme", task_id), "host:1234", px=30_000)
    r = client.delete(f"/api/v1/solutions/acme/tasks/{task_id}", headers=auth(token))
    assert (409, "Conflict") == (r.status_code, r.get_json()["type"])
    doc = client.get(f"/api/v1/solutions/acme/tasks/{task_id}", headers=auth(token)).get_json()
    assert "queued" == doc["state"]


def test_another_solution_cannot_cancel(client: FlaskClient, token: str) -> None:
    """Another solution's task is 404 to a solution's token."""
    other = client.post("/api/v1/solutions", json={"solution_id": "other"},
                        headers=auth(ADMIN)).get_json()["token"]
    r = send(client, token, {"to": ["a@example.com"], "text": "x", "send_at": later(600)})
    assert 404 == client.delete(f"/api/v1/solutions/other/tasks/{r.get_json()['task_id']}",
                                headers=auth(other)).status_code
    assert 404 == client.delete(r.get_json()["links"]["self"],
                                headers=auth(other)).status_code


def test_the_batch_route_takes_the_new_fields(
    client: FlaskClient, token: str, real_redis: redis.Redis
) -> None:
    """A batch's messages may carry attachments, templates and send_at; each is judged on
    its own (a bad one is its own 400)."""
    client.put(f"{TEMPLATES}/t", json={"subject": "S {{ x }}", "text": "T"}, headers=auth(token))
    r = client.post(f"{SEND}/batch", headers=auth(token), json={"messages": [
        {"to": ["a@example.com"], "text": "x",
         "attachments": [{"filename": "a.txt", "content": "YWJj"}]},
        {"to": ["a@example.com"], "template": "t", "template_data": {"x": 1}},
        {"to": ["a@example.com"], "text": "x", "send_at": later(600)},
        {"to": ["a@example.com"], "template": "t"},
    ]})  # fmt: skip
    results = r.get_json()["results"]
    assert [202, 202, 202, 400] == [x["status"] for x in results], results
    assert ["queued", "queued", "scheduled"] == [x["state"] for x in results[:3]]
    assert ["template_data"] == list(results[3]["fields"])
    assert 2 == queue_length(real_redis)
