"""Messages a worker cannot read are set aside in Redis with a log line and a metric, never
dropped: against a real worker process on a real broker."""

from __future__ import annotations

import json
import urllib.request
from collections import Counter
from typing import Any

import pytest
import redis
from kombu import Connection, Exchange

from postroom.dev.embedded_redis import free_port
from postroom.shared import keys
from postroom.shared.celery_wire.dead_letters import entry
from postroom.shared.queue import make_producer
from tests.e2e import Stack
from tests.stack import wait_for


def test_an_entry_keeps_why_the_headers_and_the_body_as_text() -> None:
    """An entry is JSON: the reason, the error, the headers and the body as text (bytes
    that are not UTF-8 replaced), cut at 64 KiB and saying so."""

    class Message:
        headers = {"id": "t1", "task": "postroom.send_email"}
        content_type = "application/json"
        body = b"\xff" + b"x" * (70 * 1024)

    got = json.loads(entry(Message(), "not a postroom job", ValueError("no job")))
    assert ("not a postroom job", "ValueError: no job", "t1", "application/json", True) == (
        got["reason"], got["error"], got["headers"]["id"], got["content_type"],
        got["body_cut"])
    assert "\ufffd" + "x" * (64 * 1024 - 1) == got["body"]


@pytest.mark.slow
def test_a_worker_sets_aside_what_it_cannot_read_and_goes_on_sending(
    loopback_stack: Any, real_redis: redis.Redis
) -> None:
    """Three messages a worker cannot read (a send_email without a job, an unknown task
    name, a pickled body) each end in the dead-letter list, logged and counted, and are
    acknowledged (the queue and the unacked table are empty); a send behind them is sent."""
    metrics_port = free_port()
    stack: Stack = loopback_stack(worker_metrics_port=metrics_port)
    stack.solution(hLimit=100)
    settings = stack.settings
    producer = make_producer(settings)
    producer.send_task("postroom.send_email", args=["not a job"], queue=settings.queue)
    producer.send_task("postroom.no_such_task", args=[], queue=settings.queue)
    with Connection(settings.broker_url) as conn:
        conn.Producer().publish(
            b"\x80\x04not really pickle", exchange=Exchange(settings.queue),
            routing_key=settings.queue, content_type="application/x-python-serialize",
            content_encoding="binary",
            headers={"task": "postroom.send_email", "id": "pickled"},
        )
    task_id = stack.send({"to": ["a@example.com"], "text": "x"}).get_json()["task_id"]
    worker = stack.start_worker(concurrency=1)

    assert "sent" == stack.wait_final(task_id)["state"]
    wait_for(lambda: real_redis.llen(keys.dead_letters()) == 3, 20,
             message="three dead letters")
    entries = [json.loads(e) for e in real_redis.lrange(keys.dead_letters(), 0, -1)]
    assert {"postroom.send_email": 2, "postroom.no_such_task": 1} == Counter(
        e["headers"]["task"] for e in entries)
    assert {"not a postroom job", "unknown task"} == {e["reason"] for e in entries}
    assert any("content type application/x-python-serialize is not accepted" in e["error"]
               for e in entries)
    wait_for(lambda: real_redis.hlen("unacked") == 0, 10, message="every message settled")
    assert 0 == real_redis.llen(settings.queue)

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
        page = r.read().decode()
    counted = [line for line in page.splitlines()
               if line.startswith("postroom_worker_dead_letters_total{")]
    assert 3 == sum(float(line.rsplit(" ", 1)[1]) for line in counted), counted
    assert worker.log_path is not None
    assert 3 == worker.log_path.read_text().count("was set aside in postroom:dead-letters")
