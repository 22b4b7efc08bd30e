"""Webhooks: the endpoints' routes, the events and their delivery, against a real Redis and
a real HTTP receiver on loopback. The deliverer runs in this process (threads, as in the
worker's main process); ``tests/test_webhooks_e2e.py`` runs it in real worker processes."""

from __future__ import annotations

import base64
import json
import time
from collections import deque
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import pytest
import redis
from flask.testing import FlaskClient
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from postroom.api.app import create_app
from postroom.shared import events, keys
from postroom.shared.records import Job, TaskDocument
from postroom.shared.settings import Settings
from postroom.worker.attempt_store import finish
from postroom.worker.resources import WorkerContext
from postroom.worker.webhooks import Deliverer
from tests.helpers import ADMIN, auth, create_solution, make_settings
from tests.stack import wait_for
from tests.webhook_receiver import Receiver

SID = "acme"


def webhook_settings(redis_url: str, **overrides: Any) -> Settings:
    options: dict[str, Any] = {
        "webhook_allow_hosts": ("127.0.0.1",),
        "webhook_retry_base_s": 0.05,
        "webhook_retry_max_delay_s": 0.2,
        "webhook_poll_s": 0.02,
        "webhook_timeout_s": 2.0,
        **overrides,
    }
    return make_settings(redis_url, **options)


@pytest.fixture
def receivers() -> Iterator[Callable[..., Receiver]]:
    started: list[Receiver] = []

    def make(**options: Any) -> Receiver:
        receiver = Receiver(**options).start()
        started.append(receiver)
        return receiver

    yield make
    for receiver in started:
        receiver.stop()


class Harness:
    def __init__(self, settings: Settings, client: redis.Redis, token: str | None) -> None:
        self.settings = settings
        self.redis = client
        self.api: FlaskClient = create_app(settings).test_client()
        self.token = token or create_solution(self.api, SID)
        self.deliverer: Deliverer | None = None

    def deliver(self) -> Deliverer:
        self.deliverer = Deliverer(self.settings, self.redis)
        self.deliverer.start()
        return self.deliverer

    def create(self, url: str, events_: list[str] | None = None, **body: Any) -> dict[str, Any]:
        r = self.api.post(f"/api/v1/solutions/{SID}/webhooks", headers=auth(self.token),
                          json={"url": url, "events": events_ or ["*"], **body})
        assert 201 == r.status_code, r.get_json()
        created: dict[str, Any] = r.get_json()
        return created

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        return self.api.open(f"/api/v1/solutions/{SID}/webhooks{path}", method=method,
                             headers=auth(self.token), **kwargs)


@pytest.fixture
def harness(real_redis: redis.Redis, redis_url: str) -> Iterator[Callable[..., Harness]]:
    made: list[Harness] = []

    def make(**overrides: Any) -> Harness:
        token = made[0].token if made else None  # a second one shares the solution
        h = Harness(webhook_settings(redis_url, **overrides), real_redis, token)
        made.append(h)
        return h

    yield make
    for h in made:
        if h.deliverer is not None:
            h.deliverer.stop()


def verified(secret: str, hit: Any) -> Any:
    """The body as the specification's own library reads it (it raises when the signature
    does not verify)."""
    return Webhook(secret).verify(hit.body, hit.headers)


# -- the routes -------------------------------------------------------------------------


def test_create_answers_the_secret_once_and_never_stores_it_in_clear(
    harness: Callable[..., Harness], real_redis: redis.Redis
) -> None:
    """201 carries id, url, events, description, enabled, created_at and a secret
    ``whsec_`` + base64 of 32 bytes; reads never show it, and no Redis key or value holds
    it in clear (nor its decoded bytes in base64 by another spelling)."""
    h = harness()
    created = h.create("http://127.0.0.1:9/hook", ["email.sent"], description="orders")
    secret = created["secret"]
    assert secret.startswith("whsec_") and 32 == len(base64.b64decode(secret[6:]))
    assert {"id", "url", "events", "description", "enabled", "created_at"} <= set(created)
    assert (["email.sent"], "orders", True) == (created["events"], created["description"],
                                                created["enabled"])
    shown = h.call("GET", f"/{created['id']}").get_json()
    listed = h.call("GET", "").get_json()["webhooks"]
    assert "secret" not in shown and all("secret" not in w for w in listed)
    assert [created["id"]] == [w["id"] for w in listed]
    for key in real_redis.scan_iter("*"):
        dumped = repr(real_redis.dump(key))
        assert secret[6:] not in dumped and secret not in dumped


def test_a_url_on_a_private_address_is_refused_unless_allowed(
    harness: Callable[..., Harness]
) -> None:
    """A webhook URL whose host is loopback or private is a 400 naming ``url``, unless
    ``POSTROOM_WEBHOOK_ALLOW_HOSTS`` lists it; other schemes and credentials are a 400."""
    h = harness(webhook_allow_hosts=())
    for url in ("http://127.0.0.1:8000/x", "https://10.1.2.3/x", "http://[::1]/x"):
        r = h.call("POST", "", json={"url": url, "events": ["*"]})
        assert (400, ["url"]) == (r.status_code, list(r.get_json()["fields"])), url
    for url in ("ftp://example.com/x", "http://user:pw@example.com/x", "example.com/x"):
        r = h.call("POST", "", json={"url": url, "events": ["*"]})
        assert (400, ["url"]) == (r.status_code, list(r.get_json()["fields"])), url
    allowed = harness(webhook_allow_hosts=("10.0.0.0/8",))
    allowed.create("https://10.1.2.3/x")


def test_patch_disable_delete(harness: Callable[..., Harness], real_redis: redis.Redis) -> None:
    """PATCH changes url, events, description and enabled; a disabled endpoint gets no new
    events; DELETE removes it and its queues (204, then 404)."""
    h = harness()
    wid = h.create("http://127.0.0.1:9/hook", ["email.sent"])["id"]
    r = h.call("PATCH", f"/{wid}", json={"events": ["email.failed", "email.sent"],
                                         "description": "x", "enabled": False})
    assert 200 == r.status_code, r.get_json()
    assert (["email.failed", "email.sent"], "x", False) == (
        r.get_json()["events"], r.get_json()["description"], r.get_json()["enabled"])
    assert 0 == events.emit(real_redis, SID, [(events.EMAIL_SENT, {})])
    assert 400 == h.call("PATCH", f"/{wid}", json={"enabled": "yes"}).status_code
    assert 400 == h.call("PATCH", f"/{wid}", json={"events": ["email.nope"]}).status_code
    h.call("PATCH", f"/{wid}", json={"enabled": True})
    assert 1 == events.emit(real_redis, SID, [(events.EMAIL_SENT, {})])
    assert 204 == h.call("DELETE", f"/{wid}").status_code
    assert 404 == h.call("GET", f"/{wid}").status_code
    assert [] == list(real_redis.scan_iter(keys.webhook_prefix(SID) + "*"))


def test_another_solutions_webhooks_are_not_found(harness: Callable[..., Harness]) -> None:
    """A solution's token cannot see or touch another solution's endpoints (404)."""
    h = harness()
    wid = h.create("http://127.0.0.1:9/hook")["id"]
    other = create_solution(h.api, "other")
    for method, path in (("GET", f"/{wid}"), ("DELETE", f"/{wid}"), ("GET", "")):
        r = h.api.open(f"/api/v1/solutions/{SID}/webhooks{path}", method=method,
                       headers=auth(other))
        assert 404 == r.status_code
    r = h.api.get(f"/api/v1/solutions/other/webhooks/{wid}", headers=auth(other))
    assert 404 == r.status_code


# -- delivery ---------------------------------------------------------------------------


def test_each_event_type_arrives_signed_as_the_specification_verifies(
    harness: Callable[..., Harness], receivers: Callable[..., Receiver], real_redis: redis.Redis
) -> None:
    """webhook.test, suppression.created (manual, ingested, bounce) and the email.* events
    of a document's write arrive as {type, timestamp, data}, with webhook-id,
    webhook-timestamp and a webhook-signature the standardwebhooks library verifies."""
    h = harness()
    receiver = receivers()
    created = h.create(receiver.url)
    secret = created["secret"]
    h.deliver()
    assert 202 == h.call("POST", f"/{created['id']}/test").status_code
    h.api.put(f"/api/v1/solutions/{SID}/suppressions/a@example.com", headers=auth(h.token))
    h.api.post(f"/api/v1/solutions/{SID}/events", headers=auth(h.token),
               json={"type": "complaint", "email": "b@example.com"})
    ctx = WorkerContext.build(h.settings)
    ctx.suppressions.bounce_threshold = 1
    ctx.suppressions.record_bounces(SID, {"c@example.com": {"status": "rejected", "code": 550}})
    doc = cast(TaskDocument, {"task_id": "t1", "solution_id": SID, "state": "sent",
                              "attempts": 1, "result": {"rejected": ["x@example.com"]},
                              "error": None, "metadata": {"k": "v"}})
    job = cast(Job, {"task_id": "t1", "solution_id": SID})
    finish(ctx, job, doc=doc)
    for state in ("retrying", "failed"):
        finish(ctx, cast(Job, {**job, "task_id": f"t-{state}"}),
               doc={**doc, "task_id": f"t-{state}", "state": state, "result": None})
    wanted = ["webhook.test", "suppression.created", "email.sent", "email.rejected",
              "email.retrying", "email.failed"]
    wait_for(lambda: {h.json()["type"] for h in receiver.hits} >= set(wanted), 10,
             message="every event type")
    assert 3 == len(receiver.of_type("suppression.created"))
    for hit in receiver.hits:
        body = verified(secret, hit)
        assert {"type", "timestamp", "data"} == set(body)
        assert hit.headers["webhook-id"].startswith("msg_")
        assert abs(int(hit.headers["webhook-timestamp"]) - time.time()) < 30
    sent = receiver.of_type("email.sent")[0].json()["data"]
    assert ("t1", "sent", {"k": "v"}) == (sent["task_id"], sent["state"], sent["metadata"])
    emails = {h.json()["data"]["email"] for h in receiver.of_type("suppression.created")}
    assert {"a@example.com", "b@example.com", "c@example.com"} == emails
    with pytest.raises(WebhookVerificationError):
        Webhook(events.new_secret()).verify(receiver.hits[0].body, receiver.hits[0].headers)


def test_a_canceled_task_sends_email_canceled_with_its_document(
    harness: Callable[..., Harness], receivers: Callable[..., Receiver]
) -> None:
    """Canceling a scheduled send queues ``email.canceled`` in the cancel's own step: it
    arrives signed, its data the canceled document with the send's metadata; a refused
    cancel (409) queues nothing more."""
    h = harness()
    receiver = receivers()
    secret = h.create(receiver.url, ["email.canceled"])["secret"]
    due = datetime.fromtimestamp(time.time() + 600, UTC).isoformat()
    r = h.api.post(f"/api/v1/solutions/{SID}/email", headers=auth(h.token),
                   json={"to": ["a@example.com"], "text": "x", "send_at": due,
                         "metadata": {"order": "A-17"}})  # fmt: skip
    assert 202 == r.status_code, r.get_json()
    task_id = r.get_json()["task_id"]
    path = f"/api/v1/solutions/{SID}/tasks/{task_id}"
    assert 200 == h.api.delete(path, headers=auth(h.token)).status_code
    assert 409 == h.api.delete(path, headers=auth(h.token)).status_code
    h.deliver()
    wait_for(lambda: receiver.of_type("email.canceled"), 10, message="email.canceled")
    time.sleep(0.3)
    assert 1 == len(receiver.hits)
    data = verified(secret, receiver.hits[0])["data"]
    assert (task_id, "canceled", {"order": "A-17"}) == (
        data["task_id"], data["state"], data["metadata"])


def test_no_event_without_a_document_write(
    harness: Callable[..., Harness], real_redis: redis.Redis
) -> None:
    """An attempt's last step that writes no document (or a deferred one) queues nothing;
    one that writes a sent document queues its event in the same step."""
    h = harness()
    wid = h.create("http://127.0.0.1:9/hook")["id"]
    ctx = WorkerContext.build(h.settings)
    job = cast(Job, {"task_id": "t1", "solution_id": SID})
    finish(ctx, job, release=True)
    finish(ctx, job, doc=cast(TaskDocument, {"task_id": "t1", "solution_id": SID,
                                             "state": "deferred"}))
    assert 0 == real_redis.zcard(keys.webhook_due(SID, wid))
    finish(ctx, job, doc=cast(TaskDocument, {"task_id": "t1", "solution_id": SID,
                                             "state": "sent", "result": {}}))
    assert 1 == real_redis.zcard(keys.webhook_due(SID, wid))


def test_a_batch_goes_out_on_one_connection_and_is_recorded_whole(
    harness: Callable[..., Harness], receivers: Callable[..., Receiver]
) -> None:
    """40 events queued before the deliverer starts, one slot: taken in one batch, POSTed
    one after the other (each once), every attempt in the delivery log, nothing left
    pending."""
    h = harness(webhook_endpoint_concurrency=1)
    receiver = receivers()
    wid = h.create(receiver.url, ["email.sent"])["id"]
    for n in range(40):
        events.emit(h.redis, SID, [(events.EMAIL_SENT, {"n": n})])
    h.deliver()
    wait_for(lambda: len(receiver.hits) >= 40, 10, message="40 events")
    wait_for(lambda: h.call("GET", f"/{wid}").get_json()["pending"] == 0, 5,
             message="nothing pending")
    log = h.call("GET", f"/{wid}/deliveries").get_json()["deliveries"]
    assert 40 == len({hit.headers["webhook-id"] for hit in receiver.hits}) == len(receiver.hits)
    assert 40 == len(log) and {1} == {d["attempt"] for d in log}
    assert list(range(40)) == [hit.json()["data"]["n"] for hit in receiver.hits]


def test_events_a_batch_had_no_time_for_are_given_back_due_at_once(
    harness: Callable[..., Harness], receivers: Callable[..., Receiver],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A batch POSTs an event only while its end falls within the lease; with no margin
    for any but the first, each batch POSTs one and gives the rest back at once: all five
    arrive, once each, long before their 10 s lease would have ended."""
    monkeypatch.setattr("postroom.worker.webhooks.LEASE_MARGIN_S", 0.0)
    h = harness(webhook_endpoint_concurrency=1, webhook_timeout_s=10.0)
    receiver = receivers()
    wid = h.create(receiver.url, ["email.sent"])["id"]
    for n in range(5):
        events.emit(h.redis, SID, [(events.EMAIL_SENT, {"n": n})])
    started = time.monotonic()
    h.deliver()
    wait_for(lambda: len(receiver.hits) >= 5, 8, message="five events")
    assert time.monotonic() - started < 8
    assert 5 == len({hit.headers["webhook-id"] for hit in receiver.hits}) == len(receiver.hits)
    log = wait_for(lambda: (lambda d: d if len(d) == 5 else None)(
        h.call("GET", f"/{wid}/deliveries").get_json()["deliveries"]), 5,
        message="five entries in the log")  # fmt: skip
    assert {1} == {d["attempt"] for d in log}  # given back is no attempt


def test_giving_back_leaves_alone_what_another_worker_has_taken_since(
    real_redis: redis.Redis,
) -> None:
    """``webhook_release.lua``: an event still under the lease named is due at once; one
    taken again since (another lease) or finished is left as it is."""
    from postroom.shared.scripts import script

    script_keys = [keys.webhooks(SID), keys.webhook_due(SID, "wh_1"),
                   keys.webhook_pending(SID, "wh_1"), keys.webhook_log(SID, "wh_1")]
    real_redis.delete(*script_keys)
    real_redis.hset(script_keys[0], "wh_1", json.dumps({"id": "wh_1", "enabled": True}))
    for name in ("a", "b", "c"):
        real_redis.hset(script_keys[2], name, json.dumps({"type": "t", "body": "{}",
                                                          "attempt": 0}))  # fmt: skip
        real_redis.zadd(script_keys[1], {name: 100.0})
    taken = script("webhook_claim")(real_redis, script_keys, ["wh_1", "1000.5", "15.0", 10])
    assert [b"a", b"b", b"c"] == taken[1::2]
    assert 1015.5 == real_redis.zscore(script_keys[1], "b")
    real_redis.zadd(script_keys[1], {"b": 2000.0})  # taken again by another, later
    real_redis.zrem(script_keys[1], "c")  # finished
    given = script("webhook_release")(real_redis, script_keys,
                                      ["1000.5", "15.0", "1001.25", "a", "b", "c"])  # fmt: skip
    assert 1 == given
    assert [1001.25, 2000.0, None] == [real_redis.zscore(script_keys[1], name)
                                       for name in ("a", "b", "c")]  # fmt: skip
    real_redis.delete(*script_keys)


def test_a_failing_endpoint_gets_the_same_id_on_every_retry(
    harness: Callable[..., Harness], receivers: Callable[..., Receiver]
) -> None:
    """500, 500, then 200: three POSTs with one webhook-id, and the delivery log shows the
    three attempts, newest first."""
    h = harness()
    receiver = receivers(statuses=deque([500, 500, 200]))
    created = h.create(receiver.url)
    h.deliver()
    h.call("POST", f"/{created['id']}/test")
    wait_for(lambda: len(receiver.hits) >= 3, 10, message="three attempts")
    log = wait_for(lambda: (lambda d: d if len(d) == 3 else None)(
        h.call("GET", f"/{created['id']}/deliveries").get_json()["deliveries"]), 5,
        message="three entries in the log")  # fmt: skip
    assert 1 == len({hit.headers["webhook-id"] for hit in receiver.hits})
    assert [3, 2, 1] == [d["attempt"] for d in log]
    assert [200, 500, 500] == [d["status_code"] for d in log]
    assert {receiver.hits[0].headers["webhook-id"]} == {d["event_id"] for d in log}
    assert {"id", "event_id", "type", "attempt", "status_code", "error", "at"} == set(log[0])
    time.sleep(0.3)
    assert 3 == len(receiver.hits)


def test_gives_up_after_max_attempts_and_disables_a_long_failing_endpoint(
    harness: Callable[..., Harness], receivers: Callable[..., Receiver]
) -> None:
    """An event is tried POSTROOM_WEBHOOK_MAX_ATTEMPTS times; an endpoint whose every
    delivery failed for POSTROOM_WEBHOOK_DISABLE_AFTER_S is disabled, and says why."""
    h = harness(webhook_max_attempts=3, webhook_disable_after_s=0)
    receiver = receivers(default_status=503)
    wid = h.create(receiver.url)["id"]
    h.deliver()
    h.call("POST", f"/{wid}/test")
    h.call("POST", f"/{wid}/test")
    shown = wait_for(lambda: (lambda w: w if not w["enabled"] else None)(
        h.call("GET", f"/{wid}").get_json()), 10, message="the endpoint disabled")
    assert "failing" == shown["disabled_reason"] and shown["failing_since"] is not None
    r = h.call("PATCH", f"/{wid}", json={"enabled": True})
    assert (True, None) == (r.get_json()["enabled"], r.get_json()["disabled_reason"])


def test_max_attempts_then_the_event_is_dropped(
    harness: Callable[..., Harness], receivers: Callable[..., Receiver]
) -> None:
    """With POSTROOM_WEBHOOK_MAX_ATTEMPTS=3 a refused event is POSTed three times, then no
    more, and nothing stays pending."""
    h = harness(webhook_max_attempts=3)
    receiver = receivers(default_status=500)
    wid = h.create(receiver.url)["id"]
    h.deliver()
    h.call("POST", f"/{wid}/test")
    wait_for(lambda: len(receiver.hits) >= 3, 10, message="three attempts")
    wait_for(lambda: h.call("GET", f"/{wid}").get_json()["pending"] == 0, 5,
             message="nothing pending")
    time.sleep(0.4)
    assert 3 == len(receiver.hits)


def test_rotating_the_secret_signs_with_both_for_a_while(
    harness: Callable[..., Harness], receivers: Callable[..., Receiver]
) -> None:
    """After rotate-secret, events carry two signatures (space-separated): verifiers with
    the old secret and with the new one both accept them."""
    h = harness()
    receiver = receivers()
    created = h.create(receiver.url)
    r = h.call("POST", f"/{created['id']}/rotate-secret")
    new = r.get_json()["secret"]
    assert new != created["secret"] and new.startswith("whsec_")
    h.deliver()
    h.call("POST", f"/{created['id']}/test")
    wait_for(lambda: receiver.hits, 10, message="the test event")
    hit = receiver.hits[0]
    assert 2 == len(hit.headers["webhook-signature"].split(" "))
    verified(created["secret"], hit)
    verified(new, hit)


def test_a_hanging_endpoint_does_not_hold_up_another(
    harness: Callable[..., Harness], receivers: Callable[..., Receiver]
) -> None:
    """An endpoint that never answers holds only its own slots: another endpoint's 30
    events arrive while the first hangs."""
    h = harness(webhook_timeout_s=5.0, webhook_concurrency=6, webhook_endpoint_concurrency=2)
    stuck, fine = receivers(hang=True), receivers()
    h.create(stuck.url)
    h.create(fine.url)
    h.deliver()
    started = time.monotonic()
    for _ in range(30):
        events.emit(h.redis, SID, [(events.EMAIL_SENT, {"n": 1})])
    wait_for(lambda: len(fine.hits) >= 30, 4, message="the healthy endpoint's events")
    assert time.monotonic() - started < 4
    # its two slots, held (the second may have been taken a turn after the first)
    wait_for(lambda: len(stuck.hits) >= 2, 1, message="the hanging endpoint's two POSTs")
    time.sleep(0.3)
    assert 2 == len(stuck.hits)


def test_an_address_refused_at_delivery_is_logged_and_retried(
    harness: Callable[..., Harness], real_redis: redis.Redis
) -> None:
    """The worker checks the address again when it connects: a URL that resolves to a
    private address (the allow list changed) is not contacted and the log says why."""
    h = harness()
    wid = h.create("http://127.0.0.1:9/hook")["id"]
    strict = harness(webhook_allow_hosts=())
    strict.deliver()
    h.call("POST", f"/{wid}/test")
    log = wait_for(lambda: h.call("GET", f"/{wid}/deliveries").get_json()["deliveries"], 5,
                   message="a logged attempt")
    assert log[0]["status_code"] is None and log[0]["error"].startswith("refused")


# -- metadata, the task list, 405 -------------------------------------------------------


def test_metadata_limits_name_metadata(harness: Callable[..., Harness]) -> None:
    """metadata: at most 10 string keys of at most 40 characters to strings of at most 256;
    beyond that a 400 whose fields name metadata; within, it is in the document."""
    h = harness()
    url = f"/api/v1/solutions/{SID}/email"
    bad = [{str(i): "v" for i in range(11)}, {"k" * 41: "v"}, {"k": "v" * 257}, {"k": 1},
           ["k"], "k", {"": "v"}]
    for metadata in bad:
        r = h.api.post(url, headers=auth(h.token),
                       json={"to": ["a@example.com"], "text": "x", "metadata": metadata})
        assert (400, ["metadata"]) == (r.status_code, list(r.get_json()["fields"])), metadata
    good = {str(i): "v" * 256 for i in range(10)}
    r = h.api.post(url, headers=auth(h.token),
                   json={"to": ["a@example.com"], "text": "x", "metadata": good})
    assert 202 == r.status_code, r.get_json()
    doc = h.api.get(r.headers["Location"], headers=auth(h.token)).get_json()
    assert good == doc["metadata"]
    r = h.api.post(f"{url}/batch", headers=auth(h.token), json={"messages": [
        {"to": ["b@example.com"], "text": "x", "metadata": {"order": "7"}},
        {"to": ["b@example.com"], "text": "x", "metadata": {"k" * 41: "v"}}]})  # fmt: skip
    results = r.get_json()["results"]
    assert [202, 400] == [x["status"] for x in results]
    assert ["metadata"] == list(results[1]["fields"])
    doc = h.api.get(results[0]["links"]["self"], headers=auth(h.token)).get_json()
    assert {"order": "7"} == doc["metadata"]


def test_the_task_list_newest_first_filtered_and_paged(
    harness: Callable[..., Harness], real_redis: redis.Redis
) -> None:
    """GET …/tasks lists the solution's tasks newest first, filtered by state and by
    recipient (exact address, any case), paged by an opaque cursor; the index expires with
    the documents."""
    h = harness()
    url = f"/api/v1/solutions/{SID}/email"
    ids = []
    for i in range(7):
        r = h.api.post(url, headers=auth(h.token),
                       json={"to": [f"u{i % 2}@example.com"], "text": "x"})
        assert 202 == r.status_code
        ids.append(r.get_json()["task_id"])
    r = h.api.post(f"{url}/batch", headers=auth(h.token),
                   json={"messages": [{"to": ["u1@example.com"], "text": "x"}]})
    ids.append(r.get_json()["results"][0]["task_id"])
    # one of them is sent now (as the worker would write it)
    doc_key = keys.task(SID, ids[2])
    doc = json.loads(real_redis.get(doc_key) or b"{}")
    real_redis.set(doc_key, json.dumps({**doc, "state": "sent"}))
    tasks = f"/api/v1/solutions/{SID}/tasks"
    every = h.api.get(tasks, headers=auth(h.token)).get_json()
    assert (list(reversed(ids)), None) == ([t["task_id"] for t in every["tasks"]],
                                           every["next_cursor"])
    seen, cursor = [], ""
    while True:
        page = h.api.get(f"{tasks}?limit=3{cursor}", headers=auth(h.token)).get_json()
        seen += [t["task_id"] for t in page["tasks"]]
        if page["next_cursor"] is None:
            break
        cursor = f"&cursor={page['next_cursor']}"
    assert list(reversed(ids)) == seen
    to_u1 = h.api.get(f"{tasks}?recipient=U1@Example.com", headers=auth(h.token)).get_json()
    assert [ids[7], ids[5], ids[3], ids[1]] == [t["task_id"] for t in to_u1["tasks"]]
    sent = h.api.get(f"{tasks}?state=sent", headers=auth(h.token)).get_json()
    assert [ids[2]] == [t["task_id"] for t in sent["tasks"]]
    for bad in ("state=nope", "limit=0", "limit=101", "cursor=%%%", "recipient=nope", "x=1"):
        assert 400 == h.api.get(f"{tasks}?{bad}", headers=auth(h.token)).status_code, bad
    ttl = real_redis.ttl(keys.task_index(SID))
    assert 0 < ttl <= h.settings.result_ttl


def test_405_carries_allow(harness: Callable[..., Harness]) -> None:
    """A method a route does not take is a 405 with an Allow header naming those it does."""
    h = harness()
    r = h.api.delete(f"/api/v1/solutions/{SID}/webhooks", headers=auth(ADMIN))
    assert 405 == r.status_code
    assert {"GET", "POST"} <= set(r.headers["Allow"].replace(" ", "").split(","))
    r = h.api.put(f"/api/v1/solutions/{SID}/email", headers=auth(ADMIN))
    assert (405, "MethodNotAllowed") == (r.status_code, r.get_json()["type"])
    assert "POST" in r.headers["Allow"]


def test_the_readme_verifier_accepts_our_signatures(
    harness: Callable[..., Harness], receivers: Callable[..., Receiver]
) -> None:
    """The standard-library verifier printed in the README accepts a real delivery, under
    the old and the new secret after a rotation, and refuses a changed body or a wrong
    secret."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    start = readme.index("```python\nimport base64") + len("```python\n")
    namespace: dict[str, Any] = {}
    exec(readme[start:readme.index("```", start)], namespace)  # noqa: S102 (our own README)
    verify = namespace["verify"]
    h = harness()
    receiver = receivers()
    created = h.create(receiver.url)
    new = h.call("POST", f"/{created['id']}/rotate-secret").get_json()["secret"]
    h.deliver()
    h.call("POST", f"/{created['id']}/test")
    hit = wait_for(lambda: receiver.hits[:1], 10, message="the test event")[0]
    assert verify(created["secret"], hit.headers, hit.body)
    assert verify(new, hit.headers, hit.body)
    assert not verify(new, hit.headers, hit.body + b" ")
    assert not verify(events.new_secret(), hit.headers, hit.body)


@pytest.mark.fault
def test_a_redis_killed_and_restarted_with_aof_loses_no_event(
    receivers: Callable[..., Receiver]
) -> None:
    """Redis (AOF on) is killed with -9 while 100 events are being delivered and started
    again: the deliverer rides out the outage and every event arrives, each webhook-id a
    few times at most."""
    from collections import Counter

    from postroom.dev.embedded_redis import EmbeddedRedis

    server = EmbeddedRedis(appendonly=True).start()
    deliverer: Deliverer | None = None
    try:
        client = redis.Redis.from_url(server.url)
        h = Harness(webhook_settings(server.url), client, None)
        receiver = receivers()
        h.create(receiver.url, ["email.sent"])
        for n in range(100):
            events.emit(client, SID, [(events.EMAIL_SENT, {"n": n})])
        time.sleep(1.5)  # AOF's fsync: every second
        original = receiver.released
        receiver.hang = True  # slow the first deliveries down so that some are in flight
        deliverer = h.deliver()
        wait_for(lambda: receiver.hits, 10, message="deliveries under way")
        server.kill()
        receiver.hang = False
        original.set()
        time.sleep(0.5)
        server.stop()
        server.start()
        got = wait_for(lambda: (lambda c: c if len(c) == 100 else None)(
            Counter(hit.headers["webhook-id"] for hit in receiver.hits)), 40,
            message="all 100 events")  # fmt: skip
        assert 100 == len({hit.json()["data"]["n"] for hit in receiver.hits})
        assert max(got.values()) <= 3
    finally:
        if deliverer is not None:
            deliverer.stop()
        server.cleanup()
