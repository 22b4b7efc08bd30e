"""End to end, richer messages: HTTP intake → Redis → a real Celery worker process → a
real SMTP server on loopback; the received MIME parsed back."""

from __future__ import annotations

import base64
import os
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from email import message_from_bytes
from email.message import EmailMessage
from email.policy import default as default_policy
from functools import partial
from typing import Any

import pytest
import redis

from postroom.shared import keys
from tests.e2e import Stack
from tests.helpers import auth
from tests.smtp_server import Received
from tests.stack import wait_for

pytestmark = pytest.mark.slow

PDF = b"%PDF-1.4\n" + os.urandom(200_000) + b"\r\n.\r\n\x00"
PNG = b"\x89PNG\r\n\x1a\n" + os.urandom(5_000)


@pytest.fixture
def stack(real_redis: redis.Redis, loopback_stack: Callable[..., Stack]) -> Stack:
    s = loopback_stack()
    s.solution("acme")
    return s


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def parsed(received: Received) -> EmailMessage:
    message = message_from_bytes(received.data, policy=default_policy)
    assert isinstance(message, EmailMessage)
    return message


def at(seconds: float) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat()


def test_attachments_inline_images_templates_and_headers_arrive(
    stack: Stack, real_redis: redis.Redis
) -> None:
    """A template send with an attachment (non-ASCII name), an inline image, Reply-To and
    one-click unsubscribe: the relay gets the rendered text, the parts byte-identical, the
    headers as given; the stored bytes are deleted once the task is sent. A message whose
    attachments are gone fails, sending nothing. A sandbox escape in a template is a 400
    and sends nothing."""
    token = stack.tokens["acme"]
    put = stack.client.put("/api/v1/solutions/acme/templates/invoice", headers=auth(token),
                           json={"subject": "Invoice {{ number }} for {{ name }}",
                                 "text": "Dear {{ name }}, total {{ total }}.",
                                 "html": '<p>Dear {{ name }}</p><img src="cid:logo@acme">'})
    assert 201 == put.status_code, put.get_json()
    stack.client.put("/api/v1/solutions/acme/templates/escape", headers=auth(token),
                     json={"subject": "x", "text": "{{ ''.__class__.__mro__ }}"})
    lost = stack.send({"to": ["bob@example.com"], "text": "x", "attachments": [
        {"filename": "a.txt", "content": b64(b"gone")}]}).get_json()["task_id"]
    real_redis.delete(keys.attachments("acme", lost))  # as if expired before it was sent
    stack.start_worker()
    unsubscribe = "<https://acme.example/u/42>, <mailto:unsub@acme.example>"
    r = stack.send({
        "to": ["ann@example.com"], "template": "invoice",
        "template_data": {"number": 42, "name": "Ann <Smith>", "total": "9 €"},
        "reply_to": ["billing@acme.example"],
        "headers": {"List-Unsubscribe": unsubscribe,
                    "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
                    "X-Invoice": "42"},
        "attachments": [
            {"filename": "Rechnung März 2026 – Nr. 42.pdf", "content": b64(PDF)},
            {"filename": "logo.png", "content": b64(PNG), "content_id": "logo@acme"}],
    })  # fmt: skip
    assert 202 == r.status_code, r.get_json()
    task_id = r.get_json()["task_id"]
    assert "sent" == stack.wait_final(task_id)["state"]
    [received] = stack.smtp.messages
    message = parsed(received)
    assert "Invoice 42 for Ann <Smith>" == message["Subject"]
    assert ("billing@acme.example", unsubscribe, "List-Unsubscribe=One-Click", "42") == (
        message["Reply-To"], message["List-Unsubscribe"], message["List-Unsubscribe-Post"],
        message["X-Invoice"])
    assert "multipart/mixed" == message.get_content_type()
    body, attached = message.iter_parts()
    plain, related = body.iter_parts()
    html, logo = related.iter_parts()
    assert "Dear Ann <Smith>, total 9 €." == plain.get_content().strip()
    assert "<p>Dear Ann &lt;Smith&gt;</p>" in html.get_content()
    assert (PNG, "<logo@acme>") == (logo.get_payload(decode=True), logo["Content-ID"])
    assert (PDF, "Rechnung März 2026 – Nr. 42.pdf") == (attached.get_payload(decode=True),
                                                        attached.get_filename())
    assert not real_redis.exists(keys.attachments("acme", task_id))
    gone = stack.wait_final(lost)
    assert ("failed", "the message's attachments are no longer stored") == (
        gone["state"], gone["error"]["error"])
    assert ["ann@example.com"] == [r for m in stack.smtp.messages for r in m.rcpt_tos]

    r = stack.send({"to": ["ann@example.com"], "template": "escape"})
    assert (400, ["template_data"]) == (r.status_code, list(r.get_json()["fields"]))
    time.sleep(0.5)
    assert 1 == len(stack.smtp.messages)


def test_scheduled_sends_arrive_on_time_and_a_canceled_one_never(stack: Stack) -> None:
    """``send_at`` 3 s ahead: ``scheduled`` meanwhile, received after 3 s and within 4 s
    of the request; one canceled before its time is never sent, and canceling it again, or
    canceling the sent one, is 409."""
    stack.start_worker()
    asked = time.time()
    keep = stack.send({"to": ["keep@example.com"], "text": "later", "send_at": at(3)})
    drop = stack.send({"to": ["drop@example.com"], "text": "never", "send_at": at(3)})
    assert ("scheduled", "scheduled") == (keep.get_json()["state"], drop.get_json()["state"])
    token = stack.tokens["acme"]
    canceled = stack.client.delete(drop.get_json()["links"]["self"], headers=auth(token))
    assert (200, "canceled") == (canceled.status_code, canceled.get_json()["state"])
    assert "scheduled" == stack.task(keep.get_json()["task_id"])["state"]
    doc = stack.wait_final(keep.get_json()["task_id"], timeout=10)
    assert "sent" == doc["state"]
    [received] = stack.smtp.messages
    assert ["keep@example.com"] == received.rcpt_tos
    assert 3.0 <= received.received_at - asked <= 4.0, received.received_at - asked
    time.sleep(1.0)  # the canceled job came due with the other: still never sent
    assert 1 == len(stack.smtp.messages)
    assert "canceled" == stack.task(drop.get_json()["task_id"])["state"]
    for r in (drop, keep):
        again = stack.client.delete(r.get_json()["links"]["self"], headers=auth(token))
        assert (409, "Conflict") == (again.status_code, again.get_json()["type"])


def test_a_cancel_during_the_send_is_409_and_the_message_arrives_once(stack: Stack) -> None:
    """While the worker is in the SMTP transaction the cancel is 409; the message then
    arrives once and its task ends ``sent``."""
    gate = threading.Event()
    stack.smtp.script.rcpt_gate = gate
    stack.start_worker()
    r = stack.send({"to": ["ann@example.com"], "text": "x"})
    task_id = r.get_json()["task_id"]
    wait_for(lambda: stack.smtp.held > 0, 15, message="the worker to be at RCPT TO")
    during = stack.client.delete(r.get_json()["links"]["self"], headers=auth(stack.tokens["acme"]))
    assert (409, "Conflict") == (during.status_code, during.get_json()["type"])
    gate.set()
    assert "sent" == stack.wait_final(task_id)["state"]
    assert 1 == len(stack.smtp.messages)



def test_cancels_racing_the_sends_never_end_both_sent_and_canceled(stack: Stack) -> None:
    """Forty messages queued and canceled at once while a worker sends them: each ends
    either ``canceled`` (200, never received) or ``sent`` (409, received once)."""
    token = stack.solution("race", hLimit=1000)
    stack.start_worker()
    warm = stack.send({"to": ["warm@example.com"], "text": "warm"}, "race").get_json()["task_id"]
    assert "sent" == stack.wait_final(warm, "race")["state"]  # the worker is taking messages now
    stack.smtp.messages.clear()
    links = []
    for n in range(40):
        r = stack.send({"to": [f"race{n}@example.com"], "text": f"race {n}"}, "race")
        links.append((f"race{n}@example.com", r.get_json()["links"]["self"]))
    answers = {rcpt: stack.client.delete(link, headers=auth(token)).status_code
               for rcpt, link in links}  # fmt: skip
    assert set(answers.values()) <= {200, 409}, answers
    def ended(task_id: str) -> dict[str, Any] | None:
        doc = stack.task(task_id, "race")
        return doc if doc["state"] in ("sent", "failed", "canceled") else None

    for rcpt, link in links:
        doc = wait_for(partial(ended, link.rsplit("/", 1)[1]), 20, message="every task to end")
        expected = "canceled" if answers[rcpt] == 200 else "sent"
        assert expected == doc["state"], (rcpt, doc["error"])
    time.sleep(0.5)
    received = [m.rcpt_tos[0] for m in stack.smtp.messages]
    assert sorted(received) == sorted(r for r, status in answers.items() if status == 409)
