"""Redis Sentinel: ``POSTROOM_REDIS_URL=redis+sentinel://…/<master>`` for state and kombu's
``sentinel://`` for the broker (derived from it), on a real master, replica and sentinel."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable

import pytest

from tests.e2e import Stack
from tests.stack import wait_for
from tests.topologies import SentinelSet

pytestmark = [pytest.mark.slow, pytest.mark.fault]

# the redelivery window of the Redis broker (also the accepted set's): longer than the
# longest send, 0.5 s x (11 exchanges + 1 recipient) + 2 s = 8 s (see worker/lease.py)
SHORT_WINDOW = {"smtp_timeout_s": 0.5, "max_recipients": 1, "visibility_timeout_s": 9}


def test_a_failover_loses_no_accepted_message_and_sending_resumes_by_itself(
    sentinel_set: SentinelSet, loopback_stack: Callable[..., Stack]
) -> None:
    """30 messages accepted, a few sent, then ``kill -9`` of the master: the sentinel
    promotes the replica; without a restart, the API accepts again (after 503s meanwhile)
    and the same worker sends every accepted message, each Message-ID exactly once."""
    stack = loopback_stack(redis_url=sentinel_set.state_url, **SHORT_WINDOW)
    assert stack.settings.broker_url.startswith("sentinel://")
    stack.solution("acme", hLimit=100000)
    stack.smtp.script.rcpt_delay_s = 0.05
    ids = stack.send_many(30)
    old_master = sentinel_set.master.port
    wait_for(lambda: sentinel_set.replica.client().info("replication")["master_repl_offset"]
             >= sentinel_set.master.client().info("replication")["master_repl_offset"], 10,
             message="the replica to have every accepted message")  # fmt: skip
    stack.start_worker(concurrency=2)
    wait_for(lambda: len(stack.smtp.messages) >= 3, 30, message="three messages sent")
    sentinel_set.master.kill()
    wait_for(lambda: sentinel_set.current_master_port() != old_master, 30, interval=0.2,
             message="the sentinel to promote the replica")  # fmt: skip

    def accepted_again() -> str | None:
        r = stack.send({"to": ["after@example.com"], "text": "after the failover"})
        return str(r.get_json()["task_id"]) if r.status_code == 202 else None

    ids.append(wait_for(accepted_again, 30, interval=0.5, message="the API to accept again"))
    started = time.monotonic()
    docs = stack.wait_all_final(ids, timeout=90)
    assert ["sent"] * 31 == [d["state"] for d in docs]
    assert {d["result"]["messageId"]: 1 for d in docs} == Counter(
        m.message_id for m in stack.smtp.messages)
    assert time.monotonic() - started < 90
