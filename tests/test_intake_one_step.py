"""A send checked and queued in one round trip (postroom.api.intake.one_step), on a real Redis.

A send takes the one-step path once its API process has seen the solution pass. Each test
here first sends twice: the first send takes the usual two steps and keeps the record, the
second loads the script. Every refusal on the one-step path must give the answer the usual
path gives, and write nothing twice.
"""

from __future__ import annotations

import base64
import json
from typing import Any, cast

import pytest
import redis
from flask import Flask
from flask.testing import FlaskClient

from postroom.api.app import create_app
from postroom.api.intake.one_step import MAX_KNOWN
from postroom.api.services import Services
from postroom.shared import keys
from postroom.shared.ratelimit import TokenBucket
from postroom.shared.solutions import Solution
from tests.helpers import (
    ADMIN,
    RoundTrips,
    as_bytes,
    auth,
    create_solution,
    make_settings,
    queue_length,
)

SEND = "/api/v1/solutions/acme/email"
OK = {"to": ["ann@example.com"], "text": "hello"}

# a relay on loopback may be configured (a sender allowed since: the record is dropped)
pytestmark = pytest.mark.settings(smtp_allow_hosts=("127.0.0.1",))


def services(app: Flask) -> Services:
    svc: Services = app.extensions["postroom"]
    return svc


def warm(client: FlaskClient, token: str, sid: str = "acme") -> None:
    """Two sends: the record is kept, the script loaded."""
    for _ in range(2):
        r = client.post(f"/api/v1/solutions/{sid}/email", json=OK, headers=auth(token))
        assert 202 == r.status_code, r.get_json()


def queued_jobs(real_redis: redis.Redis) -> list[dict[str, Any]]:
    """The jobs on the queue, oldest first, as the worker will read them."""
    jobs = []
    for raw in reversed(real_redis.lrange("email", 0, -1)):
        message = json.loads(raw)
        job: dict[str, Any] = json.loads(base64.b64decode(message["body"]))[1]["job"]
        jobs.append(job)
    return jobs


def test_a_later_send_reaches_redis_once(
    client: FlaskClient, real_redis: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = create_solution(client, hLimit=50)
    warm(client, token)
    trips = RoundTrips(monkeypatch)
    r = client.post(SEND, json={**OK, "cc": ["bob@example.com"], "hLimit": 20},
                    headers=auth(token))
    assert (202, 1) == (r.status_code, trips.count)
    assert ("20", "19") == (r.headers["RateLimit-Limit"], r.headers["RateLimit-Remaining"])
    assert 3 == queue_length(real_redis)


def test_one_step_writes_what_two_steps_write(
    client: FlaskClient, real_redis: redis.Redis
) -> None:
    """The job, its document (and its time to live) and its accepted-set entry are the
    same, field by field, whichever path queued them."""
    token = create_solution(client)
    warm(client, token)  # the first by two steps, the second by one
    first, second = queued_jobs(real_redis)
    assert first.keys() == second.keys()
    assert first["message"] == second["message"]
    assert first["relay"] == second["relay"]
    docs = [json.loads(real_redis.get(keys.task("acme", j["task_id"])) or b"{}")
            for j in (first, second)]
    assert [d["state"] for d in docs] == ["queued", "queued"]
    assert docs[0].keys() == docs[1].keys()
    ttls = [real_redis.ttl(keys.task("acme", j["task_id"])) for j in (first, second)]
    assert abs(ttls[0] - ttls[1]) <= 1 and ttls[0] > 0
    members = [json.loads(as_bytes(m)) for m, _ in cast(
        list[tuple[bytes, float]], real_redis.zrange(keys.accepted(), 0, -1, withscores=True))]
    assert sorted(m["task_id"] for m in members) == sorted([first["task_id"],
                                                            second["task_id"]])
    assert {json.dumps(m, sort_keys=True) for m in members} == {
        json.dumps(j, sort_keys=True) for j in (first, second)
    }


def test_a_changed_record_is_read_again(
    client: FlaskClient, real_redis: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A configuration changed since the record was kept (here by another process) is the
    one the send is judged and built on; the next send takes one step again."""
    token = create_solution(client, hLimit=50)
    warm(client, token)
    record = json.loads(real_redis.get(keys.solution("acme")) or b"{}")
    record["config"]["hLimit"] = 5
    real_redis.set(keys.solution("acme"), json.dumps(record))
    trips = RoundTrips(monkeypatch)
    r = client.post(SEND, json=OK, headers=auth(token))
    assert (202, "5", 3) == (r.status_code, r.headers["RateLimit-Limit"], trips.count)
    trips.count = 0
    r = client.post(SEND, json=OK, headers=auth(token))
    assert (202, "5", 1) == (r.status_code, r.headers["RateLimit-Limit"], trips.count)


def test_a_sender_allowed_since_the_record_was_kept_is_allowed(client: FlaskClient) -> None:
    """A check that fails on the kept record is made again on the record as it is now."""
    token = create_solution(client)
    warm(client, token)
    relay = {"connection_server": "127.0.0.1", "connection_port": 2525,
             "connection_scheme": ""}  # fmt: skip
    r = client.patch("/api/v1/solutions/acme/config", json=relay, headers=auth(ADMIN))
    assert 200 == r.status_code, r.get_json()
    with_from = {**OK, "from": "ops@example.com"}
    assert 202 == client.post(SEND, json=with_from, headers=auth(token)).status_code


def test_a_recipient_suppressed_since_is_refused(
    client: FlaskClient, real_redis: redis.Redis
) -> None:
    token = create_solution(client)
    warm(client, token)
    listed = client.put("/api/v1/solutions/acme/suppressions/ann@example.com",
                        json={"reason": "manual"}, headers=auth(token))  # fmt: skip
    assert listed.status_code in (200, 201), listed.get_json()
    r = client.post(SEND, json={**OK, "cc": ["bob@example.com"]}, headers=auth(token))
    body = r.get_json()
    assert (429, "Blocked", ["ann@example.com"]) == (r.status_code, body["type"],
                                                     body["blocked"])
    assert 2 == queue_length(real_redis)


def test_an_empty_bucket_is_refused(client: FlaskClient, real_redis: redis.Redis) -> None:
    """Tokens taken by the workers since (the record unchanged): 429 with Retry-After."""
    token = create_solution(client, hLimit=3)
    warm(client, token)
    bucket = TokenBucket(real_redis, services_period(client))
    for _ in range(3):
        assert bucket.take("acme", 3).allowed
    r = client.post(SEND, json=OK, headers=auth(token))
    assert (429, "RateLimited") == (r.status_code, r.get_json()["type"])
    assert int(r.headers["Retry-After"]) > 0
    assert 2 == queue_length(real_redis)


def services_period(client: FlaskClient) -> float:
    app = client.application
    return float(services(app).settings.hlimit_period_s)


def test_an_empty_bucket_under_defer_still_queues(
    client: FlaskClient, real_redis: redis.Redis
) -> None:
    token = create_solution(client, hLimit=2, hLimit_policy="defer")
    warm(client, token)
    bucket = TokenBucket(real_redis, services_period(client))
    for _ in range(2):
        assert bucket.take("acme", 2).allowed
    r = client.post(SEND, json=OK, headers=auth(token))
    assert (202, "0") == (r.status_code, r.headers["RateLimit-Remaining"])
    assert 3 == queue_length(real_redis)


def test_another_solutions_token_and_an_old_token_are_refused(
    client: FlaskClient, real_redis: redis.Redis
) -> None:
    token = create_solution(client)
    other = create_solution(client, "other")
    warm(client, token)
    r = client.post(SEND, json=OK, headers=auth(other))
    assert (404, "NotFound") == (r.status_code, r.get_json()["type"])
    services(client.application).solutions.rotate_token("acme")  # `postroom solution rotate-token`
    r = client.post(SEND, json=OK, headers=auth(token))
    assert (401, "Unauthorized") == (r.status_code, r.get_json()["type"])
    r = client.post(SEND, json=OK, headers=auth("no-such-token"))
    assert (401, "Unauthorized") == (r.status_code, r.get_json()["type"])
    assert 2 == queue_length(real_redis)


def test_a_deleted_token_entry_is_refused(client: FlaskClient, real_redis: redis.Redis) -> None:
    """The script itself checks whose token it is (the record is unchanged here)."""
    token = create_solution(client)
    warm(client, token)
    record = json.loads(real_redis.get(keys.solution("acme")) or b"{}")
    real_redis.delete(keys.token(record["token_hash"]))
    r = client.post(SEND, json=OK, headers=auth(token))
    assert (401, "Unauthorized") == (r.status_code, r.get_json()["type"])
    assert 2 == queue_length(real_redis)


def test_the_admin_token_takes_one_step(
    client: FlaskClient, real_redis: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    create_solution(client)
    warm(client, ADMIN)
    trips = RoundTrips(monkeypatch)
    assert 202 == client.post(SEND, json=OK, headers=auth(ADMIN)).status_code
    assert (1, 3) == (trips.count, queue_length(real_redis))


def test_a_deleted_solution_is_not_found(client: FlaskClient, real_redis: redis.Redis) -> None:
    token = create_solution(client)
    warm(client, token)
    real_redis.delete(keys.solution("acme"))
    r = client.post(SEND, json=OK, headers=auth(ADMIN))
    assert (404, "NotFound") == (r.status_code, r.get_json()["type"])
    r = client.post(SEND, json=OK, headers=auth(token))
    assert (404, "NotFound") == (r.status_code, r.get_json()["type"])
    assert 2 == queue_length(real_redis)


def test_a_flushed_script_is_loaded_and_the_message_queued_once(
    client: FlaskClient, real_redis: redis.Redis
) -> None:
    token = create_solution(client)
    warm(client, token)
    real_redis.script_flush()
    assert 202 == client.post(SEND, json=OK, headers=auth(token)).status_code
    jobs = queued_jobs(real_redis)
    assert 3 == len({j["task_id"] for j in jobs}) == len(jobs)


def test_an_idempotency_key_takes_the_usual_path(
    client: FlaskClient, real_redis: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = create_solution(client)
    warm(client, token)
    trips = RoundTrips(monkeypatch)
    headers = {**auth(token), "Idempotency-Key": "k-1"}
    first = client.post(SEND, json=OK, headers=headers)
    assert 202 == first.status_code and trips.count > 1
    again = client.post(SEND, json=OK, headers=headers)
    assert first.get_json()["task_id"] == again.get_json()["task_id"]
    assert 3 == queue_length(real_redis)


def test_a_result_backend_of_its_own_means_two_steps(
    real_redis: redis.Redis, redis_url: str
) -> None:
    elsewhere = redis_url.replace("127.0.0.1", "localhost")  # another URL: another client
    assert elsewhere != redis_url
    app = create_app(make_settings(redis_url, result_backend=elsewhere))
    assert services(app).one_step is None
    assert services(create_app(make_settings(redis_url))).one_step is not None


def test_the_kept_records_are_bounded(app: Flask) -> None:
    one_step = services(app).one_step
    assert one_step is not None
    for n in range(MAX_KNOWN + 1):
        one_step.remember(Solution(f"s{n}", 0.0, {}, digest="d"))
    assert one_step.known("s0") is None
    assert one_step.known(f"s{MAX_KNOWN}") is not None
    one_step.remember(Solution("unread", 0.0, {}))  # not read from Redis: not kept
    assert one_step.known("unread") is None
