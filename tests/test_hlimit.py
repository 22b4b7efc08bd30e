"""hLimit end to end: real Celery worker processes (two of them, as two hosts would run
them) share one Redis token bucket per solution; a real SMTP server on loopback counts
what gets through and when."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.e2e import Stack
from tests.helpers import ADMIN, auth
from tests.stack import wait_for

pytestmark = pytest.mark.slow

HOUR = 3600


@pytest.fixture
def make_stack(
    real_redis: redis.Redis, loopback_stack: Callable[..., Stack]
) -> Callable[..., Stack]:
    """A stack whose API and workers share ``hlimit_period_s`` (and any other override)."""
    return loopback_stack


def configure(stack: Stack, sid: str = "acme", **config: Any) -> None:
    r = stack.client.patch(f"/api/v1/solutions/{sid}/config", json=config, headers=auth(ADMIN))
    assert r.status_code == 200, r.get_json()


def queue(stack: Stack, n: int, sid: str = "acme", **extra: Any) -> list[str]:
    """Send ``n`` messages through intake; every one must be accepted."""
    ids = []
    for i in range(n):
        r = stack.send({"to": [f"u{i}@example.com"], "text": f"message {i}", **extra}, sid)
        assert r.status_code == 202, r.get_json()
        ids.append(r.get_json()["task_id"])
    return ids


def finals(stack: Stack, ids: list[str], sid: str = "acme",
           timeout: float = 60) -> list[dict[str, Any]]:
    return [stack.wait_final(t, sid, timeout) for t in ids]


def quota(stack: Stack, sid: str = "acme") -> dict[str, Any]:
    r = stack.client.get(f"/api/v1/solutions/{sid}/quota", headers=auth(stack.tokens[sid]))
    assert r.status_code == 200, r.get_json()
    body: dict[str, Any] = r.get_json()
    return body


def outcome_count(stack: Stack, outcome: str) -> float:
    """A service-wide outcome counter, as ``GET /metrics`` shows it."""
    text = stack.client.get("/metrics").get_data(as_text=True)
    found = re.search(rf'^postroom_messages_total{{outcome="{outcome}"}} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


def start_workers_on_a_full_queue(stack: Stack, client: redis.Redis, n: int) -> None:
    """Start ``n`` workers and let them at the queued messages only once all are ready, so
    that they race from the first message (the broker's list is renamed aside meanwhile;
    RENAME is atomic, and the messages are the bytes intake published). Batches of 5 keep
    one worker from taking the whole queue in its first broker steps (with batches sized
    for far relays it may: the race would then be between its own lanes only)."""
    name, held = stack.settings.queue, f"{stack.settings.queue}:held"
    client.rename(name, held)
    for _ in range(n):
        stack.start_worker(concurrency=2, worker_batch=5)
    wait_for(lambda: all(b" ready." in log for log in worker_logs(stack)), 30,
             message="every worker to be ready")
    client.rename(held, name)


def worker_logs(stack: Stack) -> list[bytes]:
    return [Path(str(w.log_path)).read_bytes() for w in stack.workers]


def handled_by(stack: Stack, what: bytes) -> list[int]:
    """How many log lines ``postroom.worker: <what>`` each worker wrote."""
    return [log.count(b"postroom.worker: " + what) for log in worker_logs(stack)]


def test_two_workers_send_exactly_the_limit(
    make_stack: Callable[..., Stack], real_redis: redis.Redis
) -> None:
    """200 messages, hLimit 50, two worker processes with 2 pool processes each, both
    sending: exactly 50 reach the SMTP server, each once (50 distinct Message-IDs); 150 end
    failed/RateLimited.

    All 200 go through intake before any worker runs: intake only peeks at the bucket (the
    worker takes the token), so all are accepted and the race is between the workers."""
    stack = make_stack(hlimit_period_s=HOUR)
    stack.solution("acme", hLimit=50)
    ids = queue(stack, 200)

    start_workers_on_a_full_queue(stack, real_redis, 2)
    docs = finals(stack, ids, timeout=90)

    sent = [d for d in docs if d["state"] == "sent"]
    failed = [d for d in docs if d["state"] == "failed"]
    wire_ids = [m.message_id for m in stack.smtp.messages]
    assert (50, 150) == (len(sent), len(failed))
    assert {("RateLimited", 429, 50)} == {
        (d["error"]["type"], d["error"]["status"], d["error"]["hLimit"]) for d in failed
    }
    assert 50 == len(wire_ids) == len(set(wire_ids))
    assert sorted(d["result"]["messageId"] for d in sent) == sorted(str(i) for i in wire_ids)
    sends = handled_by(stack, b"sending")
    assert (50, True) == (sum(sends), all(sends)), sends


def bucket_violations(arrivals: list[float], capacity: int, rate: float,
                      slack_s: float) -> list[tuple[int, int]]:
    """Pairs (i, j) of sorted arrivals where more messages arrived in [a_i, a_j] than the
    bucket can give in that time: ``capacity + rate * (a_j - a_i + slack_s)``. ``slack_s``
    absorbs the varying delay between taking a token and the message's arrival."""
    a = sorted(arrivals)
    return [(i, j) for i in range(len(a)) for j in range(i + 1, len(a))
            if j - i + 1 > capacity + rate * (a[j] - a[i] + slack_s)]


def test_defer_sends_everything_at_the_buckets_pace(make_stack: Callable[..., Stack]) -> None:
    """Policy defer, hLimit 10 per 20 s (a token every 2 s), 16 messages: all are sent; the
    arrivals follow the bucket (a burst of at most 10, then no faster than the refill, with
    1 s of slack for delivery jitter); a waiting message's document is ``deferred`` with
    ``next_attempt_at``; waiting messages hold no worker slot (another solution's message
    is sent while they wait); and each waiting message is deferred once, not woken again
    and again (its slot is its own)."""
    capacity, period, n = 10, 20, 16
    stack = make_stack(hlimit_period_s=period)
    stack.solution("acme", hLimit=capacity, hLimit_policy="defer")
    stack.solution("other")
    ids = queue(stack, n)
    stack.start_worker(concurrency=2)
    stack.start_worker(concurrency=2)

    def waiting() -> list[dict[str, Any]]:
        return [d for d in (stack.task(t) for t in ids) if d["state"] == "deferred"]

    line = wait_for(lambda: len(waiting()) >= 4 and waiting(), 30, message="a line to form")
    r = stack.send({"to": ["zed@example.org"], "text": "not in line"}, "other")
    other = stack.wait_final(r.get_json()["task_id"], "other", timeout=30)
    still_waiting = len(waiting())
    docs = finals(stack, ids, timeout=60)

    assert ("deferred", 0, None) == (line[0]["state"], line[0]["attempts"], line[0]["error"])
    assert line[0]["next_attempt_at"] is not None
    assert "sent" == other["state"]
    assert still_waiting > 0
    assert ["sent"] * n == [d["state"] for d in docs]
    arrivals = [m.received_at for m in stack.smtp.messages if m.rcpt_tos[0].startswith("u")]
    assert n == len(arrivals)
    assert [] == bucket_violations(arrivals, capacity, capacity / period, slack_s=1.0)
    assert n - capacity == outcome_count(stack, "deferred")


def test_a_requests_hlimit_tightens(make_stack: Callable[..., Stack]) -> None:
    """4 messages asking hLimit 2 under a solution's 100: exactly 2 are sent, 2 fail
    RateLimited naming hLimit 2, and the solution's bucket paid only for the 2."""
    stack = make_stack(hlimit_period_s=HOUR)
    stack.solution("acme", hLimit=100)
    ids = queue(stack, 4, hLimit=2)

    stack.start_worker(concurrency=2)
    docs = finals(stack, ids)

    assert ["failed", "failed", "sent", "sent"] == sorted(d["state"] for d in docs)
    assert [("RateLimited", 2)] * 2 == [
        (d["error"]["type"], d["error"]["hLimit"]) for d in docs if d["state"] == "failed"
    ]
    assert 2 == len(stack.smtp.messages)
    assert 98 == quota(stack)["remaining"]


def test_hlimit_zero_stops_sending_at_once_even_under_defer(
    make_stack: Callable[..., Stack]
) -> None:
    """Policy defer, 12 messages for hLimit 10: 10 go, 2 wait in line. hLimit set to 0: intake
    answers 429 RateLimited (no Retry-After), and the 2 waiting end failed/RateLimited with
    retry_after null when their slot comes; nothing more is sent."""
    stack = make_stack(hlimit_period_s=20)
    stack.solution("acme", hLimit=10, hLimit_policy="defer")
    ids = queue(stack, 12)
    stack.start_worker(concurrency=2)
    wait_for(lambda: [stack.task(t)["state"] for t in ids].count("deferred") == 2, 30,
             message="two messages waiting in line")

    configure(stack, hLimit=0)
    refused = stack.send({"to": ["late@example.com"], "text": "x"})
    docs = finals(stack, ids, timeout=30)

    body = refused.get_json()
    assert (429, "RateLimited", None) == (refused.status_code, body["type"], body["retry_after"])
    assert None is refused.headers.get("Retry-After")
    failed = [d["error"] for d in docs if d["state"] == "failed"]
    assert [("RateLimited", 429, None)] * 2 == [
        (e["type"], e["status"], e["retry_after"]) for e in failed
    ]
    assert 10 == len(stack.smtp.messages)


def test_a_change_of_hlimit_takes_effect_at_once(make_stack: Callable[..., Stack]) -> None:
    """hLimit 2, both used: quota says 0 left and when the next frees, intake answers 429
    with Retry-After. Raised to 5: 3 more are accepted and sent at once. Lowered to 1: the 5
    used exceed it, so 0 left and 429 again. Exactly 5 reach the SMTP server."""
    stack = make_stack(hlimit_period_s=HOUR)
    stack.solution("acme", hLimit=2)
    before = quota(stack)
    stack.start_worker(concurrency=2)
    finals(stack, queue(stack, 2))
    used_up = quota(stack)
    refused = stack.send({"to": ["late@example.com"], "text": "x"})

    configure(stack, hLimit=5)
    raised = quota(stack)
    docs = finals(stack, queue(stack, 3))
    configure(stack, hLimit=1)
    lowered = quota(stack)
    refused_again = stack.send({"to": ["later@example.com"], "text": "x"})

    view = [(q["hLimit"], q["remaining"]) for q in (before, used_up, raised, lowered)]
    assert [(2, 2), (2, 0), (5, 3), (1, 0)] == view
    assert (0.0, 0.0) == (before["retry_after"], raised["retry_after"])
    assert HOUR / 2 == pytest.approx(used_up["retry_after"], abs=5)
    assert (429, 429) == (refused.status_code, refused_again.status_code)
    assert HOUR / 2 == pytest.approx(int(refused.headers["Retry-After"]), abs=5)
    assert ["sent"] * 3 == [d["state"] for d in docs]
    assert 5 == len(stack.smtp.messages)
