"""The same guarantees on every topology postroom runs on, each on real servers:

- ``redis``: one Redis for everything (state, results, broker);
- ``rabbitmq``: RabbitMQ as the broker (a quorum queue, publisher confirms), one Redis for
  state;
- ``rabbitmq+cluster``: RabbitMQ as the broker, a real three-master Redis Cluster for state
  (``redis+cluster://``).

Each test builds its stack through the ``topology`` fixture: the API in process, real
worker processes, a real SMTP server on loopback.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.e2e import Stack
from tests.helpers import ADMIN, auth
from tests.smtp_server import ScriptedSmtpServer
from tests.stack import terminate_worker, wait_for
from tests.topologies import TOPOLOGIES, topology_settings

pytestmark = [pytest.mark.slow]

MakeStack = Callable[..., Stack]


@pytest.fixture(params=TOPOLOGIES)
def topology(request: pytest.FixtureRequest, loopback_stack: MakeStack) -> Iterator[MakeStack]:
    """Make a stack (with solution ``acme``, hLimit 100000) on the parametrized topology;
    overrides go to its settings. After the test its workers are killed outright: what
    they hold no longer matters, and a warm shutdown takes a Celery worker 2–4 s (the
    one test about warm shutdown asks for it itself)."""
    options = topology_settings(request, request.param)
    made: list[Stack] = []

    def make(**overrides: Any) -> Stack:
        stack = loopback_stack(**{**options, **overrides})
        made.append(stack)
        stack.solution("acme", hLimit=100000)
        return stack

    yield make
    for stack in made:
        for worker in stack.workers:
            if worker.proc is not None and worker.proc.poll() is None:
                worker.kill()


def message_ids(smtp: ScriptedSmtpServer) -> Counter[str | None]:
    return Counter(m.message_id for m in smtp.messages)


def admin_call(stack: Stack, method: str, path: str, **kwargs: Any) -> Any:
    return stack.client.open(f"/api/v1{path}", method=method, headers=auth(ADMIN), **kwargs)


def test_the_service_works_the_same(topology: MakeStack) -> None:
    """Administration (configuration, suppressions), a send and its document, an
    idempotency key, the batch route, a transient reply retried, ``?wait`` and the
    readiness check: each answers as it does on one Redis."""
    stack = topology()
    stack.smtp.script.data_replies.append("451 4.3.0 try again")
    stack.start_worker()
    assert 200 == stack.client.get("/api/v1/solution/ready").status_code

    r = admin_call(stack, "PATCH", "/solutions/acme/config", json={"hLimit_policy": "defer"})
    assert (200, "defer") == (r.status_code, r.get_json()["config"]["hLimit_policy"])
    r = stack.client.put("/api/v1/solutions/acme/suppressions/Blocked@Example.com",
                         json={}, headers=auth(stack.tokens["acme"]))
    assert r.status_code in (200, 201), r.get_json()
    r = stack.send({"to": ["blocked@example.com"], "text": "x"})
    assert (429, "Blocked") == (r.status_code, r.get_json()["type"])

    body = {"to": ["a@example.com"], "subject": "Hello", "text": "x"}
    first = stack.send(body, headers={"Idempotency-Key": "k1"})
    again = stack.send(body, headers={"Idempotency-Key": "k1"})
    other = stack.send({**body, "text": "y"}, headers={"Idempotency-Key": "k1"})
    assert (202, 202, 422) == (first.status_code, again.status_code, other.status_code)
    task_id = first.get_json()["task_id"]
    assert task_id == again.get_json()["task_id"]
    r = stack.client.post("/api/v1/solutions/acme/email/batch",
                          json={"messages": [{"to": ["b@example.com"], "text": "b"},
                                             {"to": ["not an address"], "text": "c"}]},
                          headers=auth(stack.tokens["acme"]))  # fmt: skip
    assert (200, 1, 1) == (r.status_code, r.get_json()["queued"], r.get_json()["refused"])
    batch_id = r.get_json()["results"][0]["task_id"]

    docs = stack.wait_all_final([task_id, batch_id], timeout=30)
    assert ["sent", "sent"] == [d["state"] for d in docs], docs
    assert 3 == sum(d["attempts"] for d in docs)  # one of the two met the 451 once
    assert docs[0]["result"]["accepted"] == ["a@example.com"]
    assert {d["result"]["messageId"]: 1 for d in docs} == message_ids(stack.smtp)
    r = stack.client.get("/api/v1/solutions/acme/quota", headers=auth(stack.tokens["acme"]))
    assert (200, 100000) == (r.status_code, r.get_json()["hLimit"])

    r = stack.send({"to": ["c@example.com"], "text": "c"}, query="?wait=20")
    assert (200, "sent") == (r.status_code, r.get_json()["state"])  # announced, then read
    r = stack.client.delete("/api/v1/solutions/acme/suppressions/blocked@example.com",
                            headers=auth(stack.tokens["acme"]))
    assert r.status_code in (200, 204)


def test_hlimit_is_exact_across_two_workers(topology: MakeStack) -> None:
    """hLimit 5 and 12 messages queued (6 single sends, a batch of 6) before two workers
    start: the intake only peeks at the full bucket, so all 12 are accepted; exactly 5 are
    sent, the other 7 end ``RateLimited``."""
    stack = topology()
    r = admin_call(stack, "PATCH", "/solutions/acme/config", json={"hLimit": 5})
    assert 200 == r.status_code, r.get_json()
    ids = stack.send_many(6)
    r = stack.client.post("/api/v1/solutions/acme/email/batch",
                          json={"messages": [{"to": [f"b{i}@example.com"], "text": "x"}
                                             for i in range(6)]},
                          headers=auth(stack.tokens["acme"]))  # fmt: skip
    ids += [x["task_id"] for x in r.get_json()["results"] if x["status"] == 202]
    assert 12 == len(ids)
    stack.start_worker(concurrency=2)
    stack.start_worker(concurrency=2)

    docs = stack.wait_all_final(ids, timeout=40)
    states = Counter(d["state"] if d["state"] == "sent" else d["error"]["type"] for d in docs)
    assert {"sent": 5, "RateLimited": 7} == states
    assert 5 == len(stack.smtp.messages)


@pytest.mark.fault
@pytest.mark.parametrize("topology", ["rabbitmq", "rabbitmq+cluster"], indirect=True)
def test_a_killed_worker_is_sent_again_within_15_s_and_none_twice(topology: MakeStack) -> None:
    """``kill -9`` of a whole worker holding 30 messages (one mid-transaction): RabbitMQ
    hands its unacknowledged messages to the other worker at once, and within 15 s of the
    kill every one of the 30 is ``sent``, each Message-ID received exactly once (the
    ledger and the lease hold)."""
    stack = topology()
    stack.smtp.script.rcpt_delay_s = 0.05
    ids = stack.send_many(30)
    first = stack.start_worker(concurrency=2)
    wait_for(lambda: len(stack.smtp.messages) >= 5, 30, message="five messages sent")
    gate = _hold(stack.smtp, 1)  # a send of the first worker's, held mid-transaction
    stack.start_worker(concurrency=2)  # it starts up meanwhile
    first.kill()
    killed_at = time.monotonic()
    gate.set()

    docs = stack.wait_all_final(ids, timeout=15)
    assert time.monotonic() - killed_at < 15
    assert ["sent"] * 30 == [d["state"] for d in docs]
    assert {d["result"]["messageId"]: 1 for d in docs} == message_ids(stack.smtp)


@pytest.mark.fault
@pytest.mark.parametrize("topology", ["rabbitmq"], indirect=True)
def test_warm_shutdown_on_rabbitmq_hands_back_what_it_holds(topology: MakeStack) -> None:
    """SIGTERM to a worker in the middle of 12 sends to a slow relay: it exits 0, what it
    had reserved goes back to the queue, and a new worker sends the rest, each once."""
    # one send in flight per process: the 12 sends outlast the SIGTERM on a busy machine
    stack = topology(sends_in_flight=2, relay_concurrency=2)
    stack.smtp.script.rcpt_delay_s = 0.2
    ids = stack.send_many(12)
    first = stack.start_worker(concurrency=2)
    wait_for(lambda: len(stack.smtp.messages) >= 2, 30, message="two messages sent")
    terminate_worker(first)
    assert first.proc is not None
    assert 0 == first.proc.wait(30)
    assert len(stack.smtp.messages) < 12
    stack.start_worker(concurrency=2)

    docs = stack.wait_all_final(ids, timeout=40)
    assert ["sent"] * 12 == [d["state"] for d in docs]
    assert {d["result"]["messageId"]: 1 for d in docs} == message_ids(stack.smtp)


def _hold(smtp: ScriptedSmtpServer, sessions: int) -> Any:
    import threading

    gate = threading.Event()
    smtp.script.rcpt_gate = gate
    wait_for(lambda: smtp.held >= sessions, 30, interval=0.01,
             message=f"{sessions} transactions held at RCPT TO")
    return gate
