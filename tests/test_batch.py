"""``POST /solutions/{sid}/email/batch`` (api/routes/batch.py), on a real Redis, and end to
end through a real worker process."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

import pytest
import redis
from flask import Flask
from flask.testing import FlaskClient

from postroom.api.app import create_app
from postroom.shared import keys
from postroom.shared.ratelimit import TokenBucket
from tests.e2e import Stack
from tests.helpers import (
    ADMIN,
    RoundTrips,
    all_bytes,
    auth,
    create_solution,
    make_settings,
    queue_length,
)

BATCH = "/api/v1/solutions/acme/email/batch"

pytestmark = pytest.mark.settings(max_batch=6)


def message(n: int, **extra: Any) -> dict[str, Any]:
    return {"to": [f"rcpt-{n}@example.com"], "subject": f"message {n}", "text": "hi", **extra}


def post(client: FlaskClient, token: str, messages: Any, **kwargs: Any) -> Any:
    return client.post(BATCH, json={"messages": messages}, headers=auth(token), **kwargs)


def queued_task_ids(real_redis: redis.Redis) -> list[str]:
    ids = []
    for raw in reversed(real_redis.lrange("email", 0, -1)):
        body = json.loads(base64.b64decode(json.loads(raw)["body"]))
        ids.append(body[1]["job"]["task_id"])
    return ids


def test_each_message_is_queued_and_answered_in_order(
    client: FlaskClient, real_redis: redis.Redis
) -> None:
    token = create_solution(client, hLimit=100)
    r = post(client, token, [message(n) for n in range(3)])
    assert 200 == r.status_code, r.get_json()
    body = r.get_json()
    assert (3, 0) == (body["queued"], body["refused"])
    results = body["results"]
    assert [0, 1, 2] == [x["index"] for x in results]
    assert {(202, "queued")} == {(x["status"], x["state"]) for x in results}
    task_ids = [x["task_id"] for x in results]
    assert task_ids == queued_task_ids(real_redis)
    for x in results:
        assert x["links"]["self"] == f"/api/v1/solutions/acme/tasks/{x['task_id']}"
        doc = client.get(x["links"]["self"], headers=auth(token)).get_json()
        assert "queued" == doc["state"]
    accepted = all_bytes(real_redis.zrange(keys.accepted(), 0, -1))
    members = {json.loads(m)["task_id"] for m in accepted}
    assert set(task_ids) == members


def test_a_batch_reaches_redis_twice_whatever_its_size(
    client: FlaskClient, real_redis: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One round trip for the caller and the solution, one for every message (the
    one-step script in one transaction)."""
    token = create_solution(client, hLimit=100)
    assert 200 == post(client, token, [message(0)]).status_code  # scripts loaded
    trips = RoundTrips(monkeypatch)
    r = post(client, token, [message(n) for n in range(5)])
    assert (5, 2) == (r.get_json()["queued"], trips.count)
    assert 6 == queue_length(real_redis)


def test_a_bad_message_is_refused_alone_with_the_answer_a_single_send_gets(
    client: FlaskClient, real_redis: redis.Redis
) -> None:
    token = create_solution(client, hLimit=100)
    listed = client.put("/api/v1/solutions/acme/suppressions/blocked@example.com",
                        json={"reason": "manual"}, headers=auth(token))  # fmt: skip
    assert listed.status_code in (200, 201)
    r = post(client, token, [
        message(0),
        {"to": ["not an address"], "text": "x"},
        "a string",
        message(3, **{"from": "me@example.com"}),
        {"to": ["Blocked@example.com"], "text": "x"},
        message(5),
    ])  # fmt: skip
    body = r.get_json()
    assert (200, 2, 4) == (r.status_code, body["queued"], body["refused"])
    got = [(x["status"], x.get("type")) for x in body["results"]]
    assert [(202, None), (400, "ValidationError"), (400, "ValidationError"),
            (400, "ValidationError"), (429, "Blocked"), (202, None)] == got  # fmt: skip
    results = body["results"]
    assert "to" in results[1]["fields"]
    assert "from" in results[3]["fields"]
    assert ["Blocked@example.com"] == results[4]["blocked"]  # as the message spelled it
    assert [results[0]["task_id"], results[5]["task_id"]] == queued_task_ids(real_redis)


def test_an_empty_bucket_refuses_each_message_under_reject_and_queues_under_defer(
    client: FlaskClient, real_redis: redis.Redis
) -> None:
    token = create_solution(client, hLimit=2)
    period = client.application.extensions["postroom"].settings.hlimit_period_s
    bucket = TokenBucket(real_redis, period)
    for _ in range(2):
        assert bucket.take("acme", 2).allowed
    r = post(client, token, [message(0), message(1)])
    results = r.get_json()["results"]
    assert {(429, "RateLimited")} == {(x["status"], x["type"]) for x in results}
    assert all(x["retry_after"] > 0 and x["hLimit"] == 2 for x in results)
    assert 0 == queue_length(real_redis)

    patched = client.patch("/api/v1/solutions/acme/config", json={"hLimit_policy": "defer"},
                           headers=auth(ADMIN))  # fmt: skip
    assert 200 == patched.status_code
    r = post(client, token, [message(0), message(1)])
    assert 2 == r.get_json()["queued"]
    assert 2 == queue_length(real_redis)


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({}, 400, "messages"),
        ({"messages": None}, 400, "messages"),
        ({"messages": {"to": ["a@example.com"]}}, 400, "messages"),
        ({"messages": []}, 400, "messages"),
        ({"messages": [message(n) for n in range(7)]}, 400, "messages"),
        ({"messages": [message(0)], "extra": 1}, 400, "extra"),
    ],
)
def test_a_bad_batch_is_refused_whole(
    client: FlaskClient, real_redis: redis.Redis, body: Any, status: int, field: str
) -> None:
    token = create_solution(client)
    r = client.post(BATCH, json=body, headers=auth(token))
    answer = r.get_json()
    assert (status, "ValidationError") == (r.status_code, answer["type"])
    assert field in answer["fields"]
    assert 0 == queue_length(real_redis)


def test_what_the_batch_does_not_take_is_named(
    client: FlaskClient, real_redis: redis.Redis
) -> None:
    token = create_solution(client)
    waited = post(client, token, [message(0)], query_string={"wait": "5"})
    keyed = client.post(BATCH, json={"messages": [message(0)]},
                        headers={**auth(token), "Idempotency-Key": "k"})  # fmt: skip
    assert (400, ["wait"]) == (waited.status_code, list(waited.get_json()["fields"]))
    assert (400, ["Idempotency-Key"]) == (keyed.status_code, list(keyed.get_json()["fields"]))
    text = client.post(BATCH, data="x", content_type="text/plain", headers=auth(token))
    assert (415, "UnsupportedMediaType") == (text.status_code, text.get_json()["type"])
    assert 0 == queue_length(real_redis)


def test_the_caller_is_judged_first(client: FlaskClient, real_redis: redis.Redis) -> None:
    """A bad token, another solution's token and an unknown solution get 401, 404, 404,
    whatever the body."""
    create_solution(client)
    other = create_solution(client, "other")
    for body in ({"messages": [message(0)]}, {"nonsense": True}):
        bad = client.post(BATCH, json=body, headers=auth("wrong"))
        foreign = client.post(BATCH, json=body, headers=auth(other))
        missing = client.post("/api/v1/solutions/nope/email/batch", json=body,
                              headers=auth(ADMIN))  # fmt: skip
        assert [401, 404, 404] == [bad.status_code, foreign.status_code, missing.status_code]
    assert 0 == queue_length(real_redis)


def test_a_result_backend_of_its_own_queues_each_on_the_usual_path(
    real_redis: redis.Redis, redis_url: str
) -> None:
    elsewhere = redis_url.replace("127.0.0.1", "localhost")  # another URL: another client
    client = create_app(make_settings(redis_url, result_backend=elsewhere)).test_client()
    token = create_solution(client)
    r = post(client, token, [message(0), {"to": []}, message(2)])
    assert [202, 400, 202] == [x["status"] for x in r.get_json()["results"]]
    assert 2 == queue_length(real_redis)


def test_scripts_redis_forgot_are_loaded_and_each_message_queued_once(
    client: FlaskClient, real_redis: redis.Redis
) -> None:
    token = create_solution(client)
    assert 200 == post(client, token, [message(0)]).status_code
    real_redis.script_flush()
    r = post(client, token, [message(n) for n in range(1, 5)])
    assert 4 == r.get_json()["queued"]
    ids = queued_task_ids(real_redis)
    assert 5 == len(ids) == len(set(ids))


@pytest.mark.slow
def test_a_batch_is_sent_end_to_end(
    real_redis: redis.Redis, loopback_stack: Callable[..., Stack]
) -> None:
    stack = loopback_stack()
    token = stack.solution("acme", hLimit=1000)
    stack.start_worker()
    r = stack.client.post(BATCH, json={"messages": [message(n) for n in range(20)]},
                          headers=auth(token))  # fmt: skip
    assert 20 == r.get_json()["queued"]
    docs = stack.wait_all_final([x["task_id"] for x in r.get_json()["results"]])
    assert {"sent"} == {d["state"] for d in docs}
    received = {m.message_id for m in stack.smtp.messages}
    assert {d["result"]["messageId"] for d in docs} == received and len(received) == 20


def test_a_broker_that_is_down_refuses_each_message_and_keeps_nothing(
    real_redis: redis.Redis, redis_url: str
) -> None:
    """Each message gets the 503 a single send gets, and no task document is left."""
    client = create_app(make_settings(redis_url, broker_url="redis://127.0.0.1:1/0")).test_client()
    token = create_solution(client)
    r = post(client, token, [message(0), message(1)])
    body = r.get_json()
    assert (200, 0, 2) == (r.status_code, body["queued"], body["refused"])
    assert {(503, "ServiceUnavailable")} == {(x["status"], x["type"]) for x in body["results"]}
    assert "nothing was accepted" in body["results"][0]["error"]
    assert [] == list(real_redis.scan_iter("postroom:*:task:*"))


def test_a_store_that_is_down_refuses_the_batch(redis_url: str) -> None:
    app = create_app(make_settings("redis://127.0.0.1:1/0"))
    r = app.test_client().post(BATCH, json={"messages": [message(0)]}, headers=auth(ADMIN))
    assert (503, "ServiceUnavailable") == (r.status_code, r.get_json()["type"])
    assert "store is unavailable" in r.get_json()["error"]


# -- a message's own idempotency_key ------------------------------------------------------


def test_a_batch_retried_with_keys_queues_nothing_twice(
    client: FlaskClient, real_redis: redis.Redis
) -> None:
    """A client that lost the answer posts the batch again: every keyed message answers
    with the task the first post made, and the queue holds each once; a message without a
    key is queued again (nothing tells it apart)."""
    token = create_solution(client, hLimit=100)
    batch = [message(0, idempotency_key="order-0"), message(1, idempotency_key="order-1"),
             message(2)]  # fmt: skip
    first = post(client, token, batch).get_json()
    again = post(client, token, batch).get_json()
    assert (3, 0) == (first["queued"], first["refused"])
    assert (3, 0) == (again["queued"], again["refused"])
    first_ids = [x["task_id"] for x in first["results"]]
    again_ids = [x["task_id"] for x in again["results"]]
    assert first_ids[:2] == again_ids[:2]
    assert first_ids[2] != again_ids[2]
    assert sorted([*first_ids, again_ids[2]]) == sorted(queued_task_ids(real_redis))
    assert {(202, "queued")} == {(x["status"], x["state"]) for x in again["results"]}


def test_a_key_is_shared_with_single_sends(client: FlaskClient, real_redis: redis.Redis) -> None:
    """A message keyed as a single send was (same key, same message) is that send."""
    token = create_solution(client, hLimit=100)
    single = client.post("/api/v1/solutions/acme/email", json=message(0),
                         headers={**auth(token), "Idempotency-Key": "k-1"})  # fmt: skip
    assert 202 == single.status_code
    r = post(client, token, [message(0, idempotency_key="k-1")]).get_json()
    assert single.get_json()["task_id"] == r["results"][0]["task_id"]
    assert 1 == queue_length(real_redis)


def test_a_key_twice_in_one_batch_is_one_message(
    client: FlaskClient, real_redis: redis.Redis
) -> None:
    token = create_solution(client, hLimit=100)
    same = message(0, idempotency_key="dup")
    r = post(client, token, [same, same]).get_json()
    assert (2, 0) == (r["queued"], r["refused"])
    assert r["results"][0]["task_id"] == r["results"][1]["task_id"]
    assert 1 == queue_length(real_redis)


def test_a_key_reused_with_another_message_is_that_messages_422(
    client: FlaskClient, real_redis: redis.Redis
) -> None:
    token = create_solution(client, hLimit=100)
    assert 202 == post(client, token, [message(0, idempotency_key="k")]).get_json()[
        "results"][0]["status"]
    r = post(client, token, [message(1, idempotency_key="k"), message(2)]).get_json()
    assert (1, 1) == (r["queued"], r["refused"])
    refused = r["results"][0]
    assert (0, 422, "IdempotencyMismatch") == (refused["index"], refused["status"],
                                               refused["type"])  # fmt: skip
    assert "idempotency_key was used with another request body" in refused["error"]
    assert 2 == queue_length(real_redis)


@pytest.mark.parametrize("key", ["", "k" * 256, "bad\nkey", 42, None])
def test_a_bad_key_is_that_messages_400_naming_it(
    client: FlaskClient, real_redis: redis.Redis, key: Any
) -> None:
    token = create_solution(client, hLimit=100)
    r = post(client, token, [message(0, idempotency_key=key), message(1)]).get_json()
    assert (1, 1) == (r["queued"], r["refused"])
    refused = r["results"][0]
    assert (400, "ValidationError") == (refused["status"], refused["type"])
    assert ["idempotency_key"] == list(refused["fields"])
    assert 1 == queue_length(real_redis)


def test_a_keyed_message_is_judged_as_any_other(
    client: FlaskClient, real_redis: redis.Redis
) -> None:
    """The schema and the suppression list refuse a keyed message as they would refuse it
    without a key; a refused keyed message leaves its key free."""
    token = create_solution(client, hLimit=100)
    client.put("/api/v1/solutions/acme/suppressions/blocked@example.com", json={},
               headers=auth(token))  # fmt: skip
    r = post(client, token, [{"to": ["not an address"], "idempotency_key": "a"},
                             {"to": ["blocked@example.com"], "idempotency_key": "b"}]).get_json()
    assert [(400, "ValidationError"), (429, "Blocked")] == [
        (x["status"], x["type"]) for x in r["results"]]
    assert 0 == queue_length(real_redis)
    retry = post(client, token, [message(0, idempotency_key="b")]).get_json()
    assert 202 == retry["results"][0]["status"]


def test_the_same_keyed_batch_posted_at_once_makes_each_message_once(
    app: Flask, real_redis: redis.Redis
) -> None:
    """Six copies of one keyed batch posted at the same moment (a client's retries racing
    its first post): every copy answers with the same three tasks, and three are queued."""
    import threading

    token = create_solution(app.test_client(), hLimit=100)
    batch = [message(n, idempotency_key=f"race-{n}") for n in range(3)]
    barrier = threading.Barrier(6)
    answers: list[list[str]] = []

    def post_copy() -> None:
        client = app.test_client()
        barrier.wait()
        r = post(client, token, batch)
        answers.append([x.get("task_id", x.get("type")) for x in r.get_json()["results"]])

    threads = [threading.Thread(target=post_copy) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert 6 == len(answers)
    assert 1 == len({tuple(a) for a in answers}), answers
    assert sorted(answers[0]) == sorted(queued_task_ids(real_redis))
