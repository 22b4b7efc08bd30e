"""Delivery guarantees under faults, on real processes: once the API answers 202 a message
ends ``sent`` or ``failed`` — never lost, never sent twice — through relays that defer,
hang or drop the connection, killed workers, a restarted Redis, a broker or result backend
that is briefly away, and clients that send the same request many times at once.

Kills are aimed: the SMTP server holds every RCPT TO at a gate, the test waits until each
pool process is held there (mid-transaction, before DATA), then kills. A kill after the
final dot and before the relay's reply is SMTP's one ambiguous window; it gets a test of
its own (the message goes out again, with the same Message-ID).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import requests

from postroom.dev.embedded_redis import EmbeddedRedis
from postroom.shared.crypto import generate_key
from tests.e2e import Stack
from tests.helpers import auth, queue_length
from tests.smtp_server import Script, ScriptedSmtpServer, SilentServer, TlsFiles
from tests.stack import ApiProcess, kill_pool_child, terminate_worker, wait_for
from tests.topologies import e2e_topologies, topology_settings

pytestmark = [pytest.mark.fault, pytest.mark.slow]

# A short redelivery window for the tests that kill whole workers or Redis: it must outlast
# the longest send, 1.5 s x (11 exchanges + 1 recipient) + 2 s = 20 s.
SHORT_WINDOW = {"smtp_timeout_s": 1.5, "max_recipients": 1, "visibility_timeout_s": 21}

MakeStack = Callable[..., Stack]


@pytest.fixture
def make_stack(loopback_stack: Callable[..., Stack]) -> MakeStack:
    """A stack whose default relay is ``smtp_server``, with settings overridden per test
    (``redis_url`` and friends included); solution ``acme`` with a generous hLimit."""

    def make(redis_url: str, **overrides: Any) -> Stack:
        stack = loopback_stack(redis_url=redis_url, **overrides)
        stack.solution("acme", hLimit=100000)
        return stack

    return make


@pytest.fixture(params=e2e_topologies())
def stack(request: pytest.FixtureRequest, make_stack: MakeStack) -> Stack:
    """A stack on the tests' Redis database, retries about a second apart; on each
    topology of ``TEST_E2E_TOPOLOGIES`` (default: one Redis; see tests/topologies.py)."""
    options = topology_settings(request, request.param)
    url = options.pop("redis_url", None) or request.getfixturevalue("redis_url")
    return make_stack(url, retry_base_s=1.0, retry_max_delay_s=1.0, **options)


@pytest.fixture
def embedded() -> Iterator[Callable[..., EmbeddedRedis]]:
    """Start private ``redis-server`` processes (the test may kill and restart them)."""
    servers: list[EmbeddedRedis] = []

    def start(**options: Any) -> EmbeddedRedis:
        server = EmbeddedRedis(**options).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.cleanup()


def restart(server: EmbeddedRedis) -> EmbeddedRedis:
    """The same ``redis-server`` again: same port, same data directory, same options (the
    same object, so the fixture that started it also stops it)."""
    server.stop()
    return server.start()


def message_ids(smtp: ScriptedSmtpServer) -> Counter[str | None]:
    return Counter(m.message_id for m in smtp.messages)


def hold_and_wait(smtp: ScriptedSmtpServer, sessions: int) -> threading.Event:
    """Close the RCPT gate and wait until ``sessions`` transactions are held at it."""
    gate = threading.Event()
    smtp.script.rcpt_gate = gate
    wait_for(lambda: smtp.held >= sessions, 30, interval=0.01,
             message=f"{sessions} transactions held at RCPT TO")
    return gate


def state_of(stack: Stack, task_id: str) -> dict[str, Any]:
    return stack.task(task_id)


# -- the relay misbehaves -------------------------------------------------------------------


def test_a_deferred_recipient_is_retried_alone(make_stack: MakeStack, real_redis: redis.Redis,
                                               redis_url: str) -> None:
    """451 to one of three RCPT TO (twice, with "try again in 1 seconds"): the other two get
    the message at once; the document is ``retrying`` with the deferred one in ``pending``
    and the next attempt set by the hint (the backoff alone would say 0.1-0.2 s); then it
    is accepted too, and its copy carries the same Message-ID."""
    stack = make_stack(redis_url, retry_base_s=0.2, retry_max_delay_s=1.0)
    tries: Counter[str] = Counter()

    def rcpt(address: str) -> str | None:
        if address == "slow@example.com":
            tries[address] += 1
            if tries[address] <= 2:
                return "451 4.2.1 mailbox busy, try again in 1 seconds"
        return None

    stack.smtp.script.rcpt_replies = rcpt
    stack.start_worker()
    to = ["a@example.com", "slow@example.com", "c@example.com"]
    task_id = stack.send({"to": to, "text": "x"}).get_json()["task_id"]

    retrying = wait_for(lambda: (d := state_of(stack, task_id))["state"] == "retrying" and d,
                        30, message="the first attempt to end")
    assert ["slow@example.com"] == retrying["pending"]
    assert ["a@example.com", "c@example.com"] == retrying["result"]["accepted"]
    assert 451 == retrying["error"]["smtp_code"]
    gap = _seconds(retrying["next_attempt_at"]) - _seconds(retrying["updated_at"])
    assert gap >= 0.95, retrying

    doc = stack.wait_final(task_id)
    assert ("sent", 3, []) == (doc["state"], doc["attempts"], doc["pending"])
    assert to == doc["result"]["accepted"]
    first, second = stack.smtp.messages
    assert (["a@example.com", "c@example.com"], ["slow@example.com"]) == (
        first.rcpt_tos, second.rcpt_tos)
    assert doc["result"]["messageId"] == first.message_id == second.message_id


def test_a_connection_dropped_mid_data_is_retried_into_one_message(stack: Stack) -> None:
    """The relay hangs up in the middle of the message: that is transient (as a 451), the
    next attempt delivers it, and the relay holds exactly one complete message."""
    stack.smtp.script.drop_data = "partial"
    stack.start_worker()
    task_id = stack.send({"to": ["a@example.com"], "text": "x"}).get_json()["task_id"]
    retrying = wait_for(lambda: (d := state_of(stack, task_id))["state"] == "retrying" and d,
                        30, interval=0.01, message="the dropped attempt")
    stack.smtp.script.drop_data = None
    assert "SmtpUnavailable" == retrying["error"]["type"]

    doc = stack.wait_final(task_id)
    assert ("sent", 2) == (doc["state"], doc["attempts"])
    assert [doc["result"]["messageId"]] == [m.message_id for m in stack.smtp.messages]


def test_a_tls_relay_dropping_mid_data_is_retried_not_failed(
    make_stack: MakeStack, real_redis: redis.Redis, redis_url: str,
    make_smtp_server: Callable[..., ScriptedSmtpServer], tls_files: TlsFiles,
) -> None:
    """Over STARTTLS, a relay that hangs up while a large message is being written cuts
    the TLS stream short; that is a lost connection (retried), not a TLS failure."""
    relay = make_smtp_server(tls="starttls", script=Script(drop_data="partial"))
    stack = make_stack(redis_url, retry_base_s=1.0, retry_max_delay_s=1.0,
                       default_smtp_url=f"smtp://127.0.0.1:{relay.port}",
                       smtp_ca_file=str(tls_files.ca_file))
    stack.start_worker()
    body = {"to": ["a@example.com"], "text": "line of text\n" * 80_000}
    task_id = stack.send(body).get_json()["task_id"]
    retrying = wait_for(lambda: (d := state_of(stack, task_id))["state"] == "retrying" and d,
                        30, interval=0.01, message="the dropped attempt")
    relay.script.drop_data = None
    assert "SmtpUnavailable" == retrying["error"]["type"]

    doc = stack.wait_final(task_id)
    assert ("sent", 2) == (doc["state"], doc["attempts"])
    assert [doc["result"]["messageId"]] == [m.message_id for m in relay.messages]


def test_connection_lost_after_the_final_dot_resends_with_the_same_message_id(
    stack: Stack,
) -> None:
    """The ambiguous window: the relay took the whole message and hung up before replying.
    postroom cannot know it arrived, so it sends again — with the same Message-ID, by
    which the recipient's side can tell the two copies are one message."""
    stack.smtp.script.drop_data = "before_reply"
    stack.start_worker()
    task_id = stack.send({"to": ["a@example.com"], "text": "x"}).get_json()["task_id"]
    wait_for(lambda: state_of(stack, task_id)["state"] == "retrying", 30, interval=0.01,
             message="the attempt whose reply was lost")
    stack.smtp.script.drop_data = None

    doc = stack.wait_final(task_id)
    assert ("sent", 2) == (doc["state"], doc["attempts"])
    [unanswered] = stack.smtp.dropped
    [answered] = stack.smtp.messages
    assert doc["result"]["messageId"] == unanswered.message_id == answered.message_id


def test_a_relay_that_stops_answering_times_out_and_is_retried(make_stack: MakeStack,
                                                               real_redis: redis.Redis,
                                                               redis_url: str) -> None:
    """A relay that never answers RCPT TO: the attempt ends after the SMTP timeout (1 s)
    as a transient timeout, and the next attempt, once the relay answers, sends the
    message once."""
    stack = make_stack(redis_url, smtp_timeout_s=1.0, retry_base_s=1.0, retry_max_delay_s=1.0)
    gate = threading.Event()
    stack.smtp.script.rcpt_gate = gate  # closed: RCPT TO is never answered
    stack.start_worker()
    task_id = stack.send({"to": ["a@example.com"], "text": "x"}).get_json()["task_id"]
    retrying = wait_for(lambda: (d := state_of(stack, task_id))["state"] == "retrying" and d,
                        20, interval=0.02, message="the attempt to time out")
    gate.set()
    assert "the relay did not answer in time" == retrying["error"]["error"]
    assert _seconds(retrying["updated_at"]) - _seconds(retrying["created_at"]) >= 1.0

    doc = stack.wait_final(task_id)
    assert ("sent", 2) == (doc["state"], doc["attempts"])
    assert [doc["result"]["messageId"]] == [m.message_id for m in stack.smtp.messages]


def test_a_relay_that_never_greets_uses_up_the_budget(make_stack: MakeStack,
                                                      real_redis: redis.Redis,
                                                      redis_url: str,
                                                      silent_server: SilentServer) -> None:
    """A relay that accepts TCP and never says a word: each attempt gives up after the SMTP
    timeout, is retried, and when the budget (2 attempts) is spent the message fails with
    ``SmtpUnavailable`` (504) — it does not hang, and it is not lost."""
    stack = make_stack(
        redis_url, smtp_timeout_s=1.0, retry_base_s=0.2, retry_max_delay_s=0.2,
        retry_max_attempts=2,
        default_smtp_url=f"smtp+plain://127.0.0.1:{silent_server.port}",
    )
    stack.start_worker()
    task_id = stack.send({"to": ["a@example.com"], "text": "x"}).get_json()["task_id"]
    doc = stack.wait_final(task_id, timeout=30)
    assert ("failed", 2) == (doc["state"], doc["attempts"])
    assert ("SmtpUnavailable", 504) == (doc["error"]["type"], doc["error"]["status"])
    assert ["a@example.com"] == doc["result"]["rejected"]


def test_an_unexpected_worker_error_ends_failed_not_queued_forever(stack: Stack) -> None:
    """A worker that meets an error of its own (here: it cannot decrypt the relay password,
    its secret key differs from the API's) records ``failed`` with ``InternalError`` (500)
    rather than leave the message ``queued`` with nothing left to move it."""
    stack.start_worker(secret_key=generate_key())
    r = stack.send({"to": ["a@example.com"], "text": "x",
                    "connection": {"server": "127.0.0.1", "port": stack.smtp.port, "scheme": "",
                                   "user": "relay-user", "password": "relay-password"}})
    doc = stack.wait_final(r.get_json()["task_id"])
    assert ("failed", "InternalError", 500) == (
        doc["state"], doc["error"]["type"], doc["error"]["status"])
    assert [] == stack.smtp.messages


# -- workers die ------------------------------------------------------------------------------


def test_a_killed_pool_process_loses_nothing(stack: Stack) -> None:
    """``kill -9`` of a pool process held mid-transaction: its message goes back to the
    queue at once and is sent by the pool's new process; all ten end ``sent``, each
    Message-ID received exactly once. (One send in flight per pool process, so that most
    of the ten are still to send when the gate closes.)"""
    stack.smtp.script.rcpt_delay_s = 0.1
    ids = stack.send_many(10)
    worker = stack.start_worker(concurrency=2, sends_in_flight=2, relay_concurrency=2)
    wait_for(lambda: len(stack.smtp.messages) >= 3, 30, message="three messages sent")
    gate = hold_and_wait(stack.smtp, 2)
    kill_pool_child(worker)
    gate.set()

    docs = stack.wait_all_final(ids, timeout=60)
    assert ["sent"] * 10 == [d["state"] for d in docs]
    assert {d["result"]["messageId"]: 1 for d in docs} == message_ids(stack.smtp)


def test_a_message_that_ends_its_process_every_time_is_given_up(
    stack: Stack, real_redis: redis.Redis
) -> None:
    """``kill -9`` of the pool process each time it holds the one message mid-transaction
    (a message that kills its process, as far as the worker can tell): twice it goes back
    onto the queue, the third time its document ends ``failed`` with an ``InternalError``
    saying why, and it is not handed out again."""
    [task_id] = stack.send_many(1)
    gate = threading.Event()
    stack.smtp.script.rcpt_gate = gate
    worker = stack.start_worker(concurrency=1)
    for n in range(3):
        wait_for(lambda: stack.smtp.held == 1, 30, interval=0.01,
                 message=f"attempt {n + 1} held at RCPT TO")  # fmt: skip
        kill_pool_child(worker)
        wait_for(lambda: stack.smtp.held == 0, 30, interval=0.01,
                 message="the killed process's session gone")  # fmt: skip
    doc = stack.wait_final(task_id)
    assert ("failed", "InternalError", 500) == (
        doc["state"], doc["error"]["type"], doc["error"]["status"])
    assert "ended 3 times" in doc["error"]["error"]
    gate.set()
    time.sleep(1.0)  # a message handed out again would reach the relay now
    assert ([], 0) == (stack.smtp.messages, stack.smtp.held)
    assert 0 == queue_length(real_redis)


def test_a_killed_worker_loses_nothing_and_sends_nothing_twice(make_stack: MakeStack,
                                                               real_redis: redis.Redis,
                                                               redis_url: str) -> None:
    """``kill -9`` of a whole worker (main process and pool) while 50 messages are queued or
    in flight, two of them held mid-transaction: after a fresh worker starts, every one
    of the 50 ends ``sent`` and the relay received each Message-ID exactly once. The two
    the dead worker held come back when the broker's redelivery window has passed. (One
    send in flight per pool process: when both are held at RCPT TO, no other transaction is
    between its final dot and its ledger write, the window SMTP itself leaves ambiguous;
    docs/delivery.md.)"""
    stack = make_stack(redis_url, sends_in_flight=2, relay_concurrency=2, **SHORT_WINDOW)
    stack.smtp.script.rcpt_delay_s = 0.05
    ids = stack.send_many(50)
    first = stack.start_worker(concurrency=2)
    wait_for(lambda: len(stack.smtp.messages) >= 10, 30, message="ten messages sent")
    gate = hold_and_wait(stack.smtp, 2)
    first.kill()
    gate.set()
    stack.start_worker(concurrency=2)

    docs = stack.wait_all_final(ids, timeout=90)
    assert ["sent"] * 50 == [d["state"] for d in docs]
    assert {d["result"]["messageId"]: 1 for d in docs} == message_ids(stack.smtp)


def test_sigterm_finishes_or_requeues_what_the_worker_holds(make_stack: MakeStack,
                                                            real_redis: redis.Redis,
                                                            redis_url: str) -> None:
    """SIGTERM to a worker in the middle of 20 sends to a slow relay: it finishes what it
    is sending, hands back what it had reserved, and exits 0; a new worker sends the rest.
    All 20 end ``sent``, each Message-ID received exactly once. (One send in flight per
    pool process, so that most of the 20 are still reserved when the signal comes.)"""
    stack = make_stack(redis_url, sends_in_flight=2, relay_concurrency=2)
    stack.smtp.script.rcpt_delay_s = 0.2
    ids = stack.send_many(20)
    first = stack.start_worker(concurrency=2)
    wait_for(lambda: len(stack.smtp.messages) >= 5, 30, message="five messages sent")
    terminate_worker(first)
    assert first.proc is not None
    assert 0 == first.proc.wait(30)
    assert len(stack.smtp.messages) < 20
    stack.start_worker(concurrency=2)

    docs = stack.wait_all_final(ids, timeout=60)
    assert ["sent"] * 20 == [d["state"] for d in docs]
    assert {d["result"]["messageId"]: 1 for d in docs} == message_ids(stack.smtp)


# -- Redis goes away ---------------------------------------------------------------------------


def test_redis_killed_and_restarted_with_aof_loses_nothing(
    make_stack: MakeStack, embedded: Callable[..., EmbeddedRedis]
) -> None:
    """The one Redis (broker, state, results; AOF on) is killed with -9 while 200 messages
    are queued and sent, and restarted on the same port and directory: meanwhile intake
    answers 503; afterwards the same worker, reconnected by itself, sends all 200, each
    Message-ID exactly once."""
    server = embedded(appendonly=True)
    stack = make_stack(server.url, **SHORT_WINDOW)
    ids = stack.send_many(200)
    stack.start_worker(concurrency=2)
    wait_for(lambda: len(stack.smtp.messages) >= 40, 30, message="forty messages sent")
    server.kill()
    r = stack.send({"to": ["late@example.com"], "text": "x"})
    assert (503, "ServiceUnavailable") == (r.status_code, r.get_json()["type"])
    time.sleep(1.0)
    server = restart(server)

    docs = stack.wait_all_final(ids, timeout=90)
    assert ["sent"] * 200 == [d["state"] for d in docs]
    assert {d["result"]["messageId"]: 1 for d in docs} == message_ids(stack.smtp)


def test_a_job_the_broker_lost_is_published_again_and_sent(
    make_stack: MakeStack, real_redis: redis.Redis, redis_url: str
) -> None:
    """The broker loses an accepted job outright (as when Redis dies between kombu's pop
    and its unacknowledged record): a redelivery window later the workers' watcher finds
    it held nowhere, publishes it again, and it is sent once."""
    stack = make_stack(redis_url, smtp_timeout_s=0.5, max_recipients=1, visibility_timeout_s=9)
    task_id = stack.send({"to": ["a@example.com"], "text": "x"}).get_json()["task_id"]
    assert 1 == real_redis.delete("email")  # the queue, with the job in it
    stack.start_worker()

    doc = stack.wait_final(task_id, timeout=60)
    assert "sent" == doc["state"]
    assert [doc["result"]["messageId"]] == [m.message_id for m in stack.smtp.messages]
    assert b"publishing it again" in stack.logs()


def test_broker_down_at_intake_is_503_and_nothing_is_accepted(
    make_stack: MakeStack, real_redis: redis.Redis, redis_url: str,
    embedded: Callable[..., EmbeddedRedis],
) -> None:
    """With the broker (a Redis of its own) down, a send answers 503 and nothing is ever
    sent for it; once the broker is back, the same API process accepts again and the
    message is sent."""
    broker = embedded()
    stack = make_stack(redis_url, broker_url=broker.url)
    stack.start_worker()
    broker.stop()
    r = stack.send({"to": ["refused@example.com"], "text": "x"})
    assert (503, "ServiceUnavailable") == (r.status_code, r.get_json()["type"])
    broker = restart(broker)

    task_id = stack.send({"to": ["a@example.com"], "text": "x"}).get_json()["task_id"]
    doc = stack.wait_final(task_id, timeout=60)
    assert "sent" == doc["state"]
    assert [["a@example.com"]] == [m.rcpt_tos for m in stack.smtp.messages]


def test_result_backend_away_when_a_send_ends_writes_the_final_state_later(
    make_stack: MakeStack, real_redis: redis.Redis, redis_url: str,
    embedded: Callable[..., EmbeddedRedis],
) -> None:
    """The result backend (a Redis of its own, no persistence) stops while the worker is
    mid-transaction: the message is sent, the worker waits for the backend, and once it is
    back (empty) the document ends ``sent`` — written from the ledger, not sent again."""
    results = embedded()
    stack = make_stack(redis_url, result_backend=results.url)
    stack.start_worker()
    gate = threading.Event()
    stack.smtp.script.rcpt_gate = gate
    task_id = stack.send({"to": ["a@example.com"], "text": "x"}).get_json()["task_id"]
    wait_for(lambda: stack.smtp.held == 1, 30, message="the transaction to be held")
    results.stop()
    gate.set()
    wait_for(lambda: len(stack.smtp.messages) == 1, 30, message="the message to arrive")
    time.sleep(1.0)  # the worker now waits for the result backend
    results = restart(results)

    def written() -> bool:
        path = f"/api/v1/solutions/acme/tasks/{task_id}"
        return 200 == stack.client.get(path, headers=auth(stack.tokens["acme"])).status_code

    wait_for(written, 30, message="the document to be written again")
    doc = stack.wait_final(task_id, timeout=30)
    assert ("sent", 1) == (doc["state"], doc["attempts"])
    assert [doc["result"]["messageId"]] == [m.message_id for m in stack.smtp.messages]


# -- clients retry ----------------------------------------------------------------------------


def test_one_idempotency_key_sent_20_times_at_once_is_one_message(
    make_stack: MakeStack, real_redis: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    """20 concurrent requests with the same Idempotency-Key and body, against a real
    ``postroom api`` (gunicorn, 4 processes): all 20 answer 202 naming one task, and the
    relay receives one message."""
    stack = make_stack(redis_url)
    stack.start_worker()
    api = ApiProcess(stack.settings, workers=4, log_path=tmp_path / "api.log").start()
    try:
        headers = {**auth(stack.tokens["acme"]), "Idempotency-Key": "order-42"}
        body = {"to": ["a@example.com"], "text": "once"}
        barrier = threading.Barrier(20)
        answers: list[tuple[int, str]] = []

        def post() -> None:
            barrier.wait()
            r = requests.post(f"{api.url}/solutions/acme/email", json=body, headers=headers,
                              timeout=30)
            answers.append((r.status_code, r.json()["task_id"]))

        threads = [threading.Thread(target=post) for _ in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        api.stop()
    assert [202] * 20 == [status for status, _ in answers]
    [task_id] = {tid for _, tid in answers}
    doc = stack.wait_final(task_id)
    assert "sent" == doc["state"]
    time.sleep(0.5)  # a second message, were there one, would be on its way by now
    assert [doc["result"]["messageId"]] == [m.message_id for m in stack.smtp.messages]


def _seconds(iso: str) -> float:
    import calendar

    stamp, _, fraction = iso.rstrip("Z").partition(".")
    return calendar.timegm(time.strptime(stamp, "%Y-%m-%dT%H:%M:%S")) + float(f"0.{fraction}")

