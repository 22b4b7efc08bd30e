"""The suppression list: the store (real Redis and fakeredis), its HTTP routes, the intake
check (429 Blocked), events, and hard bounces suppressing an address end to end."""

from __future__ import annotations

import calendar
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis
from flask.testing import FlaskClient

from postroom.shared import keys
from postroom.shared.suppressions import BOUNCE_WINDOW_S, Suppression, SuppressionStore
from tests.e2e import Stack
from tests.helpers import ADMIN, auth, queue_length
from tests.smtp_server import ScriptedSmtpServer

NOW = 1_900_000_000.0
HARD = {"status": "rejected", "code": 550, "reply": "550 5.1.1 no such user"}
LIST = "/api/v1/solutions/acme/suppressions"


def one(email: str) -> str:
    return f"{LIST}/{email}"


# -- the store ----------------------------------------------------------------------------


@pytest.fixture
def store(any_redis: redis.Redis) -> SuppressionStore:
    return SuppressionStore(any_redis, bounce_threshold=3)


def test_put_get_and_case_insensitive_match(store: SuppressionStore) -> None:
    """An entry is found under any case of its address; the first put is new, a second
    replaces it."""
    entry, created = store.put("acme", "Ann@example.com", "manual", now=NOW)
    assert (True, Suppression("Ann@example.com", "manual", NOW)) == (created, entry)
    assert entry == store.get("acme", "ann@EXAMPLE.com", now=NOW)
    _, created_again = store.put("acme", "ANN@example.com", "bounce", now=NOW + 1)
    assert created_again is False
    store.put("acme", "x@example.com", "manual", now=NOW)
    assert ["x@example.com", "ANN@example.com"] == store.blocked(
        "acme", ["bob@example.com", "x@example.com", "ANN@example.com", "x@example.com"]
    )


def test_lists_are_per_solution(store: SuppressionStore) -> None:
    """One solution's suppression does not block another's recipients."""
    store.put("acme", "ann@example.com", "manual")
    assert [] == store.blocked("other", ["ann@example.com"])


def test_an_expired_entry_blocks_nothing_and_is_purged(
    store: SuppressionStore, any_redis: redis.Redis
) -> None:
    """After ``expires_at`` the address is sendable again; listing removes the entry."""
    store.put("acme", "ann@example.com", "manual", expires_at=NOW + 60, now=NOW)
    store.put("acme", "bob@example.com", "manual", now=NOW)
    assert ["ann@example.com"] == store.blocked("acme", ["ann@example.com"], now=NOW + 59)
    assert [] == store.blocked("acme", ["ann@example.com"], now=NOW + 60)
    assert store.get("acme", "ann@example.com", now=NOW + 60) is None
    assert ["bob@example.com"] == [e.email for e in store.entries("acme", now=NOW + 61)]
    assert [b"bob@example.com"] == any_redis.hkeys(keys.suppressions("acme"))


def test_only_permanent_rcpt_rejections_count(store: SuppressionStore) -> None:
    """Accepted, 4xx, code-less and non-rejected outcomes are not bounces; 5xx ones are."""
    outcomes: dict[str, dict[str, Any]] = {
        "ok@example.com": {"status": "accepted", "code": 250, "reply": None},
        "later@example.com": {"status": "rejected", "code": 452, "reply": "452 full"},
        "spent@example.com": {"status": "rejected", "code": None, "reply": None},
        "gone@example.com": HARD,
    }
    for i in range(3):
        store.record_bounces("acme", outcomes, f"m{i}", now=NOW + i)
    assert ["gone@example.com"] == [e.email for e in store.entries("acme", now=NOW)]
    assert 0 == store.bounce_count("acme", "later@example.com")


def test_threshold_bounces_within_the_window_suppress(store: SuppressionStore) -> None:
    """The third hard bounce in seven days suppresses with reason ``bounce`` and the
    relay's reply as ``detail``; the count then restarts."""
    assert [] == store.record_bounces("acme", {"gone@example.com": HARD}, "m1", now=NOW)
    assert [] == store.record_bounces("acme", {"Gone@example.com": HARD}, "m2", now=NOW + 1)
    assert store.get("acme", "gone@example.com", now=NOW + 1) is None
    assert ["gone@example.com"] == store.record_bounces(
        "acme", {"gone@example.com": HARD}, "m3", now=NOW + 2
    )
    entry = store.get("acme", "gone@example.com", now=NOW + 3)
    assert Suppression("gone@example.com", "bounce", NOW + 2, None, str(HARD["reply"])) == entry
    assert 0 == store.bounce_count("acme", "gone@example.com")


def test_bounces_older_than_the_window_do_not_count(store: SuppressionStore) -> None:
    """Two bounces more than seven days ago and one now are one bounce, not three."""
    store.record_bounces("acme", {"gone@example.com": HARD}, "m1", now=NOW)
    store.record_bounces("acme", {"gone@example.com": HARD}, "m2", now=NOW + 1)
    later = NOW + BOUNCE_WINDOW_S + 2
    assert [] == store.record_bounces("acme", {"gone@example.com": HARD}, "m3", now=later)
    assert store.get("acme", "gone@example.com", now=later) is None


def test_one_message_counts_once(store: SuppressionStore) -> None:
    """Recording the same message's outcomes again (a redelivery) adds no bounce."""
    for _ in range(5):
        store.record_bounces("acme", {"gone@example.com": HARD}, "same-task", now=NOW)
    assert store.get("acme", "gone@example.com", now=NOW) is None


def test_threshold_zero_turns_automatic_suppression_off(any_redis: redis.Redis) -> None:
    """``POSTROOM_BOUNCE_THRESHOLD=0``: bounces are not even counted."""
    off = SuppressionStore(any_redis, bounce_threshold=0)
    for i in range(5):
        off.record_bounces("acme", {"gone@example.com": HARD}, f"m{i}")
    assert (None, 0) == (off.get("acme", "gone@example.com"), off.bounce_count(
        "acme", "gone@example.com"))


def test_bounces_never_weaken_a_complaint(store: SuppressionStore) -> None:
    """Neither the automatic bounce nor a bounce event replaces a complaint entry."""
    store.ingest("acme", "ann@example.com", "complaint", "spam report", now=NOW)
    for i in range(3):
        store.record_bounces("acme", {"ann@example.com": HARD}, f"m{i}", now=NOW + i)
    store.ingest("acme", "ann@example.com", "bounce", now=NOW + 5)
    entry = store.get("acme", "ann@example.com", now=NOW + 6)
    assert entry is not None
    assert ("complaint", "spam report", NOW) == (entry.reason, entry.detail, entry.created_at)


def test_an_event_makes_a_temporary_entry_permanent(store: SuppressionStore) -> None:
    """A complaint about an address suppressed for a while suppresses it for good."""
    store.put("acme", "ann@example.com", "manual", expires_at=NOW + 60, now=NOW)
    store.ingest("acme", "ann@example.com", "complaint", now=NOW + 1)
    entry = store.get("acme", "ann@example.com", now=NOW + 100)
    assert entry is not None
    assert ("complaint", None) == (entry.reason, entry.expires_at)


def test_remove_lifts_and_restarts_the_count(store: SuppressionStore) -> None:
    """After DELETE one more bounce is one bounce, not a fourth."""
    for i in range(3):
        store.record_bounces("acme", {"gone@example.com": HARD}, f"m{i}", now=NOW + i)
    store.record_bounces("acme", {"gone@example.com": HARD}, "m3", now=NOW + 3)
    assert (True, False) == (
        store.remove("acme", "GONE@example.com"),
        store.remove("acme", "gone@example.com"),
    )
    assert [] == store.record_bounces("acme", {"gone@example.com": HARD}, "m4", now=NOW + 4)
    assert 1 == store.bounce_count("acme", "gone@example.com")


# -- the HTTP routes ----------------------------------------------------------------------


def send(client: FlaskClient, token: str, body: dict[str, Any], **headers: str) -> Any:
    return client.post("/api/v1/solutions/acme/email", json=body,
                       headers={**auth(token), **headers})


def test_put_get_list_delete(client: FlaskClient, token: str) -> None:
    """PUT is 201 then 200, GET shows the entry, the list holds it, DELETE is 204 and
    the address is no longer suppressed (404), DELETE again is still 204."""
    h = auth(token)
    r = client.put(one("Ann@Example.com"), headers=h)
    assert (201, "Ann@example.com", "manual", None) == (
        r.status_code, r.get_json()["email"], r.get_json()["reason"], r.get_json()["expires_at"]
    )
    r = client.put(one("ann@example.com"), json={"reason": "bounce"}, headers=h)
    assert (200, "bounce") == (r.status_code, r.get_json()["reason"])
    assert "bounce" == client.get(one("ANN@example.com"), headers=h).get_json()["reason"]
    listed = client.get(LIST, headers=h).get_json()["suppressions"]
    assert ["ann@example.com"] == [e["email"] for e in listed]
    assert 204 == client.delete(one("ann@example.com"), headers=h).status_code
    r = client.get(one("ann@example.com"), headers=h)
    assert (404, "NotFound") == (r.status_code, r.get_json()["type"])
    assert 204 == client.delete(one("ann@example.com"), headers=h).status_code


def test_expiry_by_ttl_or_time(client: FlaskClient, token: str) -> None:
    """``ttl_s`` and ``expires_at`` both set an RFC 3339 ``expires_at``; giving both, or a
    time in the past, is a 400 naming the field."""
    h = auth(token)
    before = time.time()
    r = client.put(one("a@example.com"), json={"ttl_s": 3600}, headers=h)
    expires = r.get_json()["expires_at"]
    ts = calendar.timegm(time.strptime(expires, "%Y-%m-%dT%H:%M:%S.%fZ"))
    assert before + 3599 <= ts <= before + 3601
    r = client.put(one("b@example.com"), json={"expires_at": "2099-01-31T12:00:00Z"},
                   headers=h)
    assert "2099-01-31T12:00:00.000Z" == r.get_json()["expires_at"]
    both = {"expires_at": "2099-01-31T12:00:00Z", "ttl_s": 5}
    for body, field in ((both, "ttl_s"), ({"expires_at": "2001-01-01T00:00:00Z"}, "expires_at")):
        r = client.put(one("c@example.com"), json=body, headers=h)
        assert (400, [field]) == (r.status_code, list(r.get_json()["fields"]))


def test_an_address_with_a_slash_in_the_path(client: FlaskClient, token: str) -> None:
    """A local part may hold '/', and the path still names the whole address."""
    h = auth(token)
    assert 201 == client.put(one("a/b@example.com"), headers=h).status_code
    assert "a/b@example.com" == client.get(one("a/b@example.com"), headers=h).get_json()["email"]


def test_an_invalid_address_in_the_path_is_400(client: FlaskClient, token: str) -> None:
    """The path's address is validated as a recipient is; the error names ``email``."""
    r = client.put(one("not-an-address"), headers=auth(token))
    assert (400, "ValidationError", ["email"]) == (
        r.status_code, r.get_json()["type"], list(r.get_json()["fields"])
    )


def test_another_solutions_list_is_404(client: FlaskClient, token: str) -> None:
    """A solution cannot read or change another's list (nor learn it exists)."""
    client.post("/api/v1/solutions", json={"solution_id": "other"}, headers=auth(ADMIN))
    for method in ("get", "put", "delete"):
        r = getattr(client, method)("/api/v1/solutions/other/suppressions/a@example.com",
                                    headers=auth(token))
        assert 404 == r.status_code, method
    r = client.get("/api/v1/solutions/nope/suppressions", headers=auth(ADMIN))
    assert 404 == r.status_code


def test_send_to_a_suppressed_recipient_is_429_blocked(
    client: FlaskClient, token: str, real_redis: redis.Redis
) -> None:
    """Any suppressed recipient in to, cc or bcc (any case) refuses the whole message:
    429 ``Blocked`` listing them, nothing enqueued."""
    client.put(one("Ann@Example.com"), headers=auth(token))
    client.put(one("hidden@example.com"), headers=auth(token))
    before = queue_length(real_redis)
    r = send(client, token, {"to": ["ok@example.com"], "cc": ["ANN@example.com"],
                             "bcc": ["hidden@example.com"], "text": "x"})
    body = r.get_json()
    assert (429, "Blocked", 429) == (r.status_code, body["type"], body["status"])
    assert ["ANN@example.com", "hidden@example.com"] == body["blocked"]
    assert "Retry-After" not in r.headers
    assert before == queue_length(real_redis)


def test_blocked_comes_before_rate_limited(client: FlaskClient, token: str) -> None:
    """With hLimit 0 and a suppressed recipient, the answer is Blocked (retrying later
    would not help)."""
    client.patch("/api/v1/solutions/acme/config", json={"hLimit": 0}, headers=auth(ADMIN))
    client.put(one("ann@example.com"), headers=auth(token))
    assert "Blocked" == send(client, token, {"to": ["ann@example.com"]}).get_json()["type"]
    assert "RateLimited" == send(client, token, {"to": ["bob@example.com"]}).get_json()["type"]


def test_an_idempotent_replay_is_answered_before_blocked(
    client: FlaskClient, token: str, real_redis: redis.Redis
) -> None:
    """A send accepted before the address was suppressed replays its 202; a new send is
    Blocked."""
    body = {"to": ["ann@example.com"], "text": "x"}
    first = send(client, token, body, **{"Idempotency-Key": "k1"})
    client.put(one("ann@example.com"), headers=auth(token))
    again = send(client, token, body, **{"Idempotency-Key": "k1"})
    assert (202, first.get_json()) == (again.status_code, again.get_json())
    assert 429 == send(client, token, body, **{"Idempotency-Key": "k2"}).status_code
    assert 1 == queue_length(real_redis)


@pytest.mark.parametrize("kind", ["complaint", "bounce"])
def test_an_event_suppresses_at_once(client: FlaskClient, token: str, kind: str) -> None:
    """One reported complaint or (hard) bounce suppresses the address, with its detail."""
    r = client.post("/api/v1/solutions/acme/events", headers=auth(token),
                    json={"type": kind, "email": "Ann@Example.com", "detail": "reported"})
    assert (200, kind, "Ann@example.com", "reported") == (
        r.status_code, r.get_json()["reason"], r.get_json()["email"], r.get_json()["detail"]
    )
    assert "Blocked" == send(client, token, {"to": ["ann@example.com"]}).get_json()["type"]


def test_only_the_admin_lifts_a_complaint(client: FlaskClient, token: str) -> None:
    """A solution's token may not lift or replace a complaint entry (403); the admin may."""
    client.post("/api/v1/solutions/acme/events", headers=auth(token),
                json={"type": "complaint", "email": "ann@example.com"})
    for r in (client.delete(one("ann@example.com"), headers=auth(token)),
              client.put(one("ann@example.com"), json={"ttl_s": 1}, headers=auth(token))):
        assert (403, "Forbidden") == (r.status_code, r.get_json()["type"])
    assert 204 == client.delete(one("ann@example.com"), headers=auth(ADMIN)).status_code
    assert 202 == send(client, token, {"to": ["ann@example.com"]}).status_code


# -- end to end: hard bounces through a real worker -----------------------------------


@pytest.mark.slow
def test_three_hard_bounces_suppress_and_delete_lifts(
    real_redis: redis.Redis,
    smtp_server: ScriptedSmtpServer,
    loopback_stack: Callable[..., Stack],
) -> None:
    """Three sends that the relay refuses with 550 for an address (one bounce each):
    the fourth send to it is 429 Blocked, listing it; DELETE lifts it and a send is
    accepted again."""
    stack = loopback_stack()
    token = stack.solution("acme")
    smtp_server.script.rcpt_replies = {"gone@example.com": "550 5.1.1 no such user"}
    stack.start_worker()
    try:
        for _ in range(3):
            r = stack.send({"to": ["gone@example.com"], "text": "x"})
            assert 202 == r.status_code, r.get_json()
            doc = stack.wait_final(r.get_json()["task_id"])
            assert ("failed", 550) == (doc["state"], doc["error"]["smtp_code"])
        r = stack.send({"to": ["Gone@example.com"], "cc": ["ok@example.com"], "text": "x"})
        assert (429, "Blocked", ["Gone@example.com"]) == (
            r.status_code, r.get_json()["type"], r.get_json()["blocked"]
        )
        entry = stack.client.get(one("gone@example.com"), headers=auth(token)).get_json()
        assert ("bounce", "550 5.1.1 no such user") == (entry["reason"], entry["detail"])
        assert 204 == stack.client.delete(one("gone@example.com"), headers=auth(token)).status_code
        smtp_server.script.rcpt_replies = {}
        r = stack.send({"to": ["gone@example.com"], "text": "x"})
        assert "sent" == stack.wait_final(r.get_json()["task_id"])["state"]
    finally:
        stack.stop()
