"""The intake's reads in one round trip (postroom.api.intake.checks), on a real Redis."""

from __future__ import annotations

import json

import pytest
import redis
from flask.testing import FlaskClient

from postroom.api.app import create_app
from postroom.shared import keys
from postroom.worker import attempt_store
from postroom.worker.resources import WorkerContext
from tests.helpers import ADMIN, RoundTrips, auth, create_solution, make_settings, queue_length

SEND = "/api/v1/solutions/acme/email"
OK = {"to": ["ann@example.com"], "text": "hello"}

pytestmark = pytest.mark.settings(hlimit_default=7)


def test_a_first_send_reaches_redis_twice(
    client: FlaskClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Token, solution, suppressions and bucket in one round trip; the job in another.
    (Later sends of the same solution take one: tests/test_intake_one_step.py.)"""
    token = create_solution(client, hLimit=50)
    other = create_solution(client, "other")
    warm = client.post("/api/v1/solutions/other/email", json=OK, headers=auth(other))
    assert 202 == warm.status_code  # connections opened, scripts loaded
    trips = RoundTrips(monkeypatch)
    r = client.post(SEND, json={**OK, "cc": ["bob@example.com"], "hLimit": 20},
                    headers=auth(token))
    assert (202, 2) == (r.status_code, trips.count)


def test_the_bucket_capacity_is_the_solutions_unless_the_request_asks_less(
    client: FlaskClient,
) -> None:
    token = create_solution(client, hLimit=50)
    headers = auth(token)
    assert "50" == client.post(SEND, json=OK, headers=headers).headers["RateLimit-Limit"]
    tighter = client.post(SEND, json={**OK, "hLimit": 5}, headers=headers)
    assert "5" == tighter.headers["RateLimit-Limit"]
    looser = client.post(SEND, json={**OK, "hLimit": 500}, headers=headers)
    assert "50" == looser.headers["RateLimit-Limit"]


def test_a_record_that_names_no_hlimit_takes_the_default(
    client: FlaskClient, real_redis: redis.Redis
) -> None:
    token = create_solution(client)
    record = json.loads(real_redis.get(keys.solution("acme")) or b"{}")
    del record["config"]["hLimit"]
    real_redis.set(keys.solution("acme"), json.dumps(record))
    r = client.post(SEND, json=OK, headers=auth(token))
    assert (202, "7") == (r.status_code, r.headers["RateLimit-Limit"])


def test_a_limit_change_is_seen_by_the_next_send(client: FlaskClient) -> None:
    token = create_solution(client, hLimit=3)
    headers = auth(token)
    assert "3" == client.post(SEND, json=OK, headers=headers).headers["RateLimit-Limit"]
    for hlimit, expected in ((1, (202, "1")), (0, (429, None))):
        r = client.patch("/api/v1/solutions/acme/config", json={"hLimit": hlimit},
                         headers=auth(ADMIN))
        assert 200 == r.status_code, r.get_json()
        sent = client.post(SEND, json=OK, headers=headers)
        assert expected == (sent.status_code, sent.headers.get("RateLimit-Limit"))


def test_scripts_redis_forgot_are_loaded_again(
    client: FlaskClient, real_redis: redis.Redis
) -> None:
    token = create_solution(client, hLimit=50)
    assert 202 == client.post(SEND, json=OK, headers=auth(token)).status_code
    real_redis.script_flush()
    before = queue_length(real_redis)
    r = client.post(SEND, json=OK, headers=auth(token))
    assert (202, "50", before + 1) == (
        r.status_code, r.headers["RateLimit-Limit"], queue_length(real_redis))


def test_a_suppressed_recipient_among_others_is_named(client: FlaskClient) -> None:
    token = create_solution(client)
    assert 201 == client.put("/api/v1/solutions/acme/suppressions/bob@example.com",
                             headers=auth(token)).status_code
    r = client.post(SEND, json={"to": ["ann@example.com"], "bcc": ["Bob@Example.com"],
                                "text": "x"}, headers=auth(token))
    assert (429, "Blocked", ["Bob@example.com"]) == (
        r.status_code, r.get_json()["type"], r.get_json()["blocked"])


def test_the_admin_token_may_send_for_a_solution(client: FlaskClient) -> None:
    create_solution(client)
    assert 202 == client.post(SEND, json=OK, headers=auth(ADMIN)).status_code


def test_a_solution_without_hlimit_has_the_same_limit_at_intake_and_in_the_worker(
    real_redis: redis.Redis, redis_url: str
) -> None:
    """A record that names no hLimit has ``POSTROOM_HLIMIT_DEFAULT`` (7 here): the intake's
    peek and the worker's take (both reading the record in Redis) answer with that limit."""
    settings = make_settings(redis_url, hlimit_default=7)
    client = create_app(settings).test_client()
    token = create_solution(client)
    record = json.loads(real_redis.get(keys.solution("acme")) or b"{}")
    del record["config"]["hLimit"]
    real_redis.set(keys.solution("acme"), json.dumps(record))
    r = client.post(SEND, json=OK, headers=auth(token))
    assert (202, "7") == (r.status_code, r.headers["RateLimit-Limit"])

    ctx = WorkerContext.build(settings)
    first = attempt_store.FirstTake(settings.hlimit_period_s, None, ctx.ledger.ttl_s,
                            settings.hlimit_default)  # fmt: skip
    begun = attempt_store.begin(ctx, "acme", r.get_json()["task_id"], 30.0, first, OK["to"])
    assert begun.take is not None and begun.solution is not None
    assert (True, 7, 7) == (
        begun.take.allowed, begun.take.limit, begun.solution.hlimit(settings.hlimit_default))
