"""End to end: HTTP intake → Redis broker → a real Celery worker process → a real SMTP
server on loopback → the task document."""

from __future__ import annotations

from collections.abc import Callable
from email import message_from_bytes
from email.policy import default as default_policy
from pathlib import Path

import pytest

from tests.e2e import Stack
from tests.smtp_server import Script, ScriptedSmtpServer
from tests.topologies import e2e_topologies, topology_settings

pytestmark = pytest.mark.slow


@pytest.fixture(params=e2e_topologies())
def stack(request: pytest.FixtureRequest, loopback_stack: Callable[..., Stack]) -> Stack:
    """A stack with solution ``acme``, on each topology of ``TEST_E2E_TOPOLOGIES``
    (default: one Redis; ``all`` adds RabbitMQ and RabbitMQ + Redis Cluster)."""
    s = loopback_stack(**topology_settings(request, request.param))
    s.solution("acme")
    return s


def test_a_message_is_sent_and_its_document_tells_how(stack: Stack) -> None:
    """202 at once, then ``sent`` with nodemailer's info: accepted, envelope, response,
    messageId; the wire message has the Message-ID, UTF-8 and no Bcc header."""
    stack.start_worker()
    r = stack.send({"to": ["ann@example.com"], "cc": ["bob@example.com"],
                    "bcc": ["hidden@example.com"], "subject": "Grüße ✓",
                    "text": "plain body", "html": "<p>html body</p>"})
    assert r.status_code == 202
    doc = stack.wait_final(r.get_json()["task_id"])
    assert doc["state"] == "sent", doc
    assert doc["attempts"] == 1
    result = doc["result"]
    assert result["accepted"] == ["ann@example.com", "bob@example.com", "hidden@example.com"]
    assert result["rejected"] == []
    assert result["envelope"] == {
        "from": "no-reply@postroom.test",
        "to": ["ann@example.com", "bob@example.com", "hidden@example.com"],
    }
    assert result["response"].startswith("250")
    assert result["messageId"].startswith("<") and result["messageId"].endswith("@postroom.test>")
    [received] = stack.smtp.messages
    assert received.rcpt_tos == ["ann@example.com", "bob@example.com", "hidden@example.com"]
    assert received.message_id == result["messageId"]
    msg = message_from_bytes(received.data, policy=default_policy)
    assert msg["Subject"] == "Grüße ✓"
    assert msg["Bcc"] is None and b"hidden@example.com" not in received.data
    assert msg.get_content_type() == "multipart/alternative"


def test_wait_answers_200_with_the_final_document(stack: Stack) -> None:
    """``?wait=N`` is the synchronous send: 200 and the document when it ends in time."""
    stack.start_worker()
    r = stack.send({"to": ["ann@example.com"], "text": "x"}, query="?wait=20")
    assert r.status_code == 200, r.get_json()
    assert r.get_json()["state"] == "sent"


def test_wait_that_runs_out_answers_202(stack: Stack) -> None:
    """With no worker running, ``?wait=1`` gives up and answers the usual 202."""
    r = stack.send({"to": ["ann@example.com"], "text": "x"}, query="?wait=1")
    assert r.status_code == 202
    assert r.get_json()["state"] == "queued"


def test_callers_own_relay_with_auth_and_from(
    stack: Stack, make_smtp_server: Callable[..., ScriptedSmtpServer], tmp_path: Path
) -> None:
    """``connection`` sends through the caller's relay, logs in, uses ``from``; the
    password appears in no document, broker message or log line."""
    relay = make_smtp_server(auth=("relay-user", "pa55-w0rd-xyz"))
    stack.start_worker()
    r = stack.send({
        "to": ["ann@example.com"], "from": "sender@example.org", "text": "x",
        "connection": {"server": "127.0.0.1", "port": relay.port, "scheme": "",
                       "user": "relay-user", "password": "pa55-w0rd-xyz"},
    })
    assert r.status_code == 202, r.get_json()
    doc = stack.wait_final(r.get_json()["task_id"])
    assert doc["state"] == "sent", doc
    assert [m.login for m in relay.messages] == ["relay-user"]
    assert relay.messages[0].mail_from == "sender@example.org"
    assert doc["result"]["messageId"].endswith("@example.org>")
    assert stack.smtp.messages == []
    assert b"pa55-w0rd-xyz" not in stack.logs()
    assert "pa55-w0rd-xyz" not in str(doc)


def test_partial_rejection_still_sends(stack: Stack) -> None:
    """550 to one of three recipients: sent to the others, that one in ``rejected``."""
    stack.smtp.script.rcpt_replies = {"bad@example.com": "550 5.1.1 no such user"}
    stack.start_worker()
    r = stack.send({"to": ["a@example.com", "bad@example.com", "c@example.com"], "text": "x"})
    doc = stack.wait_final(r.get_json()["task_id"])
    assert doc["state"] == "sent", doc
    assert doc["result"]["accepted"] == ["a@example.com", "c@example.com"]
    assert doc["result"]["rejected"] == ["bad@example.com"]
    assert stack.smtp.messages[0].rcpt_tos == ["a@example.com", "c@example.com"]


def test_all_rejected_fails_with_the_code_and_reply(stack: Stack) -> None:
    """550 to every recipient: ``failed``, ``SmtpRejected`` with the code and reply."""
    stack.smtp.script.rcpt_replies = lambda addr: "550 5.1.1 no such user"
    stack.start_worker()
    r = stack.send({"to": ["a@example.com", "b@example.com"], "text": "x"})
    doc = stack.wait_final(r.get_json()["task_id"])
    assert doc["state"] == "failed"
    assert doc["error"]["type"] == "SmtpRejected"
    assert doc["error"]["status"] == 502
    assert doc["error"]["smtp_code"] == 550
    assert "no such user" in doc["error"]["smtp_response"]
    assert stack.smtp.messages == []


def test_transient_replies_are_retried(stack: Stack) -> None:
    """421, then 451, then 250: one message arrives and the document shows 3 attempts."""
    stack.smtp.script.data_replies.extend(["421 4.3.2 try later", "451 4.3.0 try again"])
    stack.start_worker()
    r = stack.send({"to": ["a@example.com"], "text": "x"})
    doc = stack.wait_final(r.get_json()["task_id"])
    assert (doc["state"], doc["attempts"]) == ("sent", 3), doc
    assert len(stack.smtp.messages) == 1


def test_retry_budget_spent_is_smtp_unavailable(stack: Stack) -> None:
    """A relay that keeps answering 451 ends ``failed`` with ``SmtpUnavailable`` (504)."""
    stack.smtp.script.data_replies.extend(["451 4.3.0 busy"] * 20)
    stack.start_worker()
    r = stack.send({"to": ["a@example.com"], "text": "x"})
    doc = stack.wait_final(r.get_json()["task_id"])
    assert doc["state"] == "failed"
    assert (doc["error"]["type"], doc["error"]["status"]) == ("SmtpUnavailable", 504)
    assert doc["attempts"] == stack.settings.retry_max_attempts
    assert doc["result"]["rejected"] == ["a@example.com"]


def test_hlimit_reject_policy_sends_exactly_the_limit(stack: Stack) -> None:
    """With hLimit 2, four sends queued at once deliver exactly 2; the others end
    ``failed``/``RateLimited`` (429) with a ``retry_after``."""
    stack.client.patch("/api/v1/solutions/acme/config", json={"hLimit": 2},
                       headers={"Authorization": "Bearer test-admin-token"})
    ids = [stack.send({"to": [f"u{i}@example.com"], "text": "x"}).get_json()["task_id"]
           for i in range(4)]
    stack.start_worker()
    docs = [stack.wait_final(t) for t in ids]
    states = sorted(d["state"] for d in docs)
    assert states == ["failed", "failed", "sent", "sent"]
    limited = [d["error"] for d in docs if d["state"] == "failed"]
    assert {e["type"] for e in limited} == {"RateLimited"}
    assert all(e["status"] == 429 and e["retry_after"] > 0 for e in limited)
    assert len(stack.smtp.messages) == 2
    # now intake refuses at once, with Retry-After
    r = stack.send({"to": ["late@example.com"], "text": "x"})
    assert (r.status_code, r.get_json()["type"]) == (429, "RateLimited")
    assert int(r.headers["Retry-After"]) >= 1
    unused = Script()
    assert unused.drop_data is None


def test_kept_connections_carry_many_messages(stack: Stack) -> None:
    """A worker process keeps its SMTP connection: six messages in a row need at most one
    connection per pool process, and each arrives once."""
    stack.start_worker(concurrency=2)
    for i in range(6):
        r = stack.send({"to": [f"u{i}@example.com"], "text": "x"}, query="?wait=20")
        assert r.get_json()["state"] == "sent"
    assert len({m.message_id for m in stack.smtp.messages}) == 6
    assert 1 <= stack.smtp.connections <= 2


def test_a_content_rejection_is_not_a_bounce(stack: Stack) -> None:
    """A 5xx to the message itself (a content filter) fails the send but does not count
    against the recipient: after three, the address is not suppressed."""
    stack.smtp.script.data_replies.extend(["554 5.7.1 looks like spam"] * 3)
    stack.start_worker()
    for _ in range(3):
        doc = stack.send({"to": ["ann@example.com"], "text": "x"}, query="?wait=20").get_json()
        assert (doc["state"], doc["error"]["smtp_code"]) == ("failed", 554)
    r = stack.send({"to": ["ann@example.com"], "text": "x"})
    assert r.status_code == 202, r.get_json()


def test_a_relay_that_offers_pipelining_gets_the_same_answers(stack: Stack) -> None:
    """The relay offers PIPELINING: the worker pipelines each envelope, and every document
    says what it would say without (accepted, rejected, the reply to the message)."""
    stack.smtp.pipelining = True
    stack.smtp.script.rcpt_replies = {"bad@example.com": "550 5.1.1 no such user"}
    stack.start_worker(concurrency=1)
    docs = [
        stack.send({"to": [f"u{i}@example.com", "bad@example.com"], "text": "x"},
                   query="?wait=20").get_json()
        for i in range(3)
    ]  # fmt: skip
    assert [("sent", [f"u{i}@example.com"], ["bad@example.com"]) for i in range(3)] == [
        (d["state"], d["result"]["accepted"], d["result"]["rejected"]) for d in docs]
    assert all(d["result"]["response"].startswith("250") for d in docs)
    assert [[f"u{i}@example.com"] for i in range(3)] == [m.rcpt_tos for m in stack.smtp.messages]
    assert 1 == stack.smtp.connections
