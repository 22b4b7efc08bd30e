"""Webhooks end to end: real worker processes deliver the events of real sends (aiosmtpd on
loopback) to a real HTTP receiver, and survive a kill -9 without losing one."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from standardwebhooks.webhooks import Webhook

from postroom.shared import events
from tests.e2e import Stack
from tests.helpers import auth
from tests.stack import wait_for
from tests.webhook_receiver import Receiver

pytestmark = pytest.mark.slow

WEBHOOKS = {"webhook_allow_hosts": ("127.0.0.1",), "webhook_retry_base_s": 0.1,
            "webhook_poll_s": 0.05, "webhook_timeout_s": 1.0}


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver().start()
    yield r
    r.stop()


def _endpoint(stack: Stack, url: str, kinds: list[str]) -> dict[str, Any]:
    r = stack.client.post("/api/v1/solutions/acme/webhooks", headers=auth(stack.tokens["acme"]),
                          json={"url": url, "events": kinds})
    assert 201 == r.status_code, r.get_json()
    created: dict[str, Any] = r.get_json()
    return created


def test_every_email_event_of_real_sends_arrives_signed_with_metadata(
    real_redis: redis.Redis, loopback_stack: Callable[..., Stack], receiver: Receiver
) -> None:
    """A sent message (email.sent), one a recipient refused (email.sent + email.rejected),
    one deferred once by the relay (email.retrying, then email.sent) and one every
    recipient refused (email.failed): each event verified by standardwebhooks, its data the
    task document with the send's metadata; the endpoint's secret is not in the logs."""
    stack = loopback_stack(**WEBHOOKS)
    stack.solution("acme")
    secret = _endpoint(stack, receiver.url, ["*"])["secret"]
    stack.smtp.script.rcpt_replies = {"rej@example.com": "550 5.1.1 no such user"}
    stack.start_worker()
    sends = {
        "plain": {"to": ["ann@example.com"]},
        "partly": {"to": ["ann@example.com", "rej@example.com"]},
        "failed": {"to": ["rej@example.com"]},
    }
    ids = {}
    for name, body in sends.items():
        r = stack.send({**body, "text": "x", "metadata": {"name": name}})
        assert 202 == r.status_code, r.get_json()
        ids[name] = r.get_json()["task_id"]
    stack.wait_all_final(list(ids.values()))
    stack.smtp.script.mail_replies.append("451 4.3.0 try again later")
    r = stack.send({"to": ["bob@example.com"], "text": "x", "metadata": {"name": "later"}})
    ids["later"] = r.get_json()["task_id"]
    assert "sent" == stack.wait_final(ids["later"])["state"]

    expected = Counter({("plain", "email.sent"): 1, ("partly", "email.sent"): 1,
                        ("partly", "email.rejected"): 1, ("failed", "email.failed"): 1,
                        ("later", "email.retrying"): 1, ("later", "email.sent"): 1})

    def arrived() -> Counter[tuple[str, str]] | None:
        got = Counter((h.json()["data"]["metadata"]["name"], h.json()["type"])
                      for h in receiver.hits)
        return got if got >= expected else None

    wait_for(arrived, 20, message="every event")
    for hit in receiver.hits:
        body = Webhook(secret).verify(hit.body, hit.headers)
        name = body["data"]["metadata"]["name"]
        assert ids[name] == body["data"]["task_id"]
    rejected = [h.json()["data"] for h in receiver.of_type("email.rejected")]
    assert ["rej@example.com"] == rejected[0]["result"]["rejected"]
    logs = stack.logs()
    assert logs and secret[6:].encode() not in logs  # the worker's log never holds it


@pytest.mark.fault
def test_kill_9_of_the_delivering_worker_loses_no_event(
    real_redis: redis.Redis, loopback_stack: Callable[..., Stack]
) -> None:
    """50 events queued; the worker delivering them is killed (-9) while its POSTs hang;
    another worker delivers all 50, each webhook-id a few times at most."""
    receiver = Receiver(hang=True).start()
    try:
        stack = loopback_stack(**WEBHOOKS)
        stack.solution("acme")
        _endpoint(stack, receiver.url, ["email.sent"])
        for n in range(50):
            events.emit(real_redis, "acme", [(events.EMAIL_SENT, {"n": n})])
        first = stack.start_worker(concurrency=1)
        wait_for(lambda: receiver.hits, 30, message="deliveries under way")
        first.kill()
        receiver.hang = False
        receiver.released.set()
        started = time.monotonic()
        stack.start_worker(concurrency=1)
        got = wait_for(lambda: (lambda c: c if len(c) == 50 else None)(
            Counter(h.headers["webhook-id"] for h in receiver.hits)), 40,
            message="all 50 events")  # fmt: skip
        assert 50 == len({h.json()["data"]["n"] for h in receiver.hits})
        assert max(got.values()) <= 3
        assert time.monotonic() - started < 40
    finally:
        receiver.stop()
