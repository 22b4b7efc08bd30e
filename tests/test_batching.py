"""Batches of queued messages (postroom.worker.batching): how the main process hands them out and
settles them, the redelivery-window rule, and the stop flag.

The strategy is driven here by a recording stand-in for Celery's pool, so that each
hand-out and each answer can be ordered by the test; the same code runs in real workers
in tests/test_batching_e2e.py and every end-to-end test.
"""

from __future__ import annotations

import json
import threading
from typing import Any, cast

import pytest
import redis

from postroom.shared import keys
from postroom.shared.celery_wire.dead_letters import DeadLetters
from postroom.shared.celery_wire.task_message import decode_body
from postroom.shared.records import Job
from postroom.worker import batching
from postroom.worker.batching import BatchStrategy, Item, fits_window
from postroom.worker.lease import attempt_bound_s
from tests.helpers import make_settings


class Pool:
    """Records ``apply_async`` calls; the test answers them."""

    def __init__(self, processes: int) -> None:
        self.num_processes = processes
        self.calls: list[tuple[list[Item], Any, Any]] = []

    def apply_async(self, fn: Any, args: tuple[Any, ...], callback: Any,
                    error_callback: Any) -> None:
        assert fn is batching.run_batch
        self.calls.append((args[0], callback, error_callback))


class Channel:
    def __init__(self, with_ack_many: bool = False) -> None:
        self.closed = False
        self.delivering = False
        self.after_delivery: Any = None
        self.acked_together: list[list[str]] = []
        if with_ack_many:
            self.ack_many = lambda messages: self.acked_together.append(
                [m.job_id for m in messages])


class Message:
    def __init__(self, job_id: str, channel: Channel, body: Any = None) -> None:
        self.job_id = job_id
        self.channel = channel
        job = {"task_id": job_id, "solution_id": "acme", "message": {"to": ["a@example.com"]}}
        self.body = json.dumps([[], {"job": job}, {}]).encode() if body is None else body


class Hub:
    """Records what is handed to the event loop; the test runs it."""

    def __init__(self) -> None:
        self.ready: list[tuple[Any, tuple[Any, ...]]] = []

    def call_soon(self, fn: Any, *args: Any) -> None:
        self.ready.append((fn, args))


class Consumer:
    def __init__(self, pool: Pool, hub: Hub | None = None) -> None:
        self.pool = pool
        self.connection_errors = (ConnectionError,)
        self.hub = hub


class App:
    def __init__(self, batch: int, redis_url: str = "redis://127.0.0.1:1/0") -> None:
        # the dead-letter list's Redis is reached only when a message cannot be read
        self.conf = {"postroom_worker_batch": batch,
                     "postroom_settings": make_settings(redis_url)}


class Outcomes:
    """What the strategy did with each message: acked, requeued, or dropped."""

    def __init__(self) -> None:
        self.acked: list[str] = []
        self.requeued: list[str] = []
        self.dropped: list[str] = []

    def deliver(self, strategy: BatchStrategy, message: Message) -> None:
        def ack(logger: Any, errors: Any) -> None:
            self.acked.append(message.job_id)

        def reject(logger: Any, errors: Any, requeue: bool) -> None:
            (self.requeued if requeue else self.dropped).append(message.job_id)

        strategy(message, None, ack, reject, set())


@pytest.fixture(autouse=True)
def fresh_flag() -> None:
    batching.install(lambda items: [True] * len(items))


def make(processes: int = 2, batch: int = 4, hub: Hub | None = None,
         redis_url: str = "redis://127.0.0.1:1/0") -> tuple[BatchStrategy, Pool, Outcomes]:
    pool = Pool(processes)
    strategy = BatchStrategy(task=None, app=App(batch, redis_url),
                             consumer=Consumer(pool, hub))
    return strategy, pool, Outcomes()


def ids(items: list[Item]) -> list[str]:
    return [i.job["task_id"] for i in items]


def test_a_message_goes_to_a_free_process_at_once() -> None:
    strategy, pool, out = make(processes=2)
    channel = Channel()
    out.deliver(strategy, Message("m1", channel))
    out.deliver(strategy, Message("m2", channel))
    assert [["m1"], ["m2"]] == [ids(items) for items, _, _ in pool.calls]


def test_messages_wait_while_every_process_is_busy_then_go_together() -> None:
    strategy, pool, out = make(processes=1, batch=4)
    channel = Channel()
    for n in range(7):
        out.deliver(strategy, Message(f"m{n}", channel))
    assert [["m0"]] == [ids(items) for items, _, _ in pool.calls]  # the rest wait
    _, done, _ = pool.calls[0]
    done([True])
    assert ["m1", "m2", "m3", "m4"] == ids(pool.calls[1][0])  # at most the batch size
    pool.calls[1][1]([True] * 4)
    assert ["m5", "m6"] == ids(pool.calls[2][0])
    assert (0, 1) == (len(strategy.waiting), strategy.busy)


def test_each_message_is_acknowledged_or_requeued_by_its_own_verdict() -> None:
    strategy, pool, out = make(processes=1)
    channel = Channel()
    for n in range(4):
        out.deliver(strategy, Message(f"m{n}", channel))
    pool.calls[0][1]([True])
    pool.calls[1][1]([True, False, True])  # m2: Redis away, or past its window
    assert (["m0", "m1", "m3"], ["m2"]) == (out.acked, out.requeued)


def test_a_short_answer_requeues_the_messages_it_does_not_cover() -> None:
    strategy, pool, out = make(processes=1)
    channel = Channel()
    for n in range(3):
        out.deliver(strategy, Message(f"m{n}", channel))
    pool.calls[0][1]([True])
    pool.calls[1][1]([True])
    assert (["m0", "m1"], ["m2"]) == (out.acked, out.requeued)


def test_a_lost_batch_is_handed_out_again_one_message_at_a_time() -> None:
    """m2 kills its pool process every time: alone, it takes no other message down with
    it, and it goes back onto the queue as a lone lost message does."""
    strategy, pool, out = make(processes=1, batch=8)
    channel = Channel()
    for n in range(4):
        out.deliver(strategy, Message(f"m{n}", channel))
    pool.calls[0][1]([True])
    assert ["m1", "m2", "m3"] == ids(pool.calls[1][0])
    out.deliver(strategy, Message("m4", channel))  # arrives while the batch runs
    pool.calls[1][2](RuntimeError("WorkerLostError"))
    assert ([], 3) == (out.requeued, len(pool.calls))  # nothing back to the broker
    assert ["m1"] == ids(pool.calls[2][0])  # first in line, alone
    pool.calls[2][1]([True])
    assert ["m2"] == ids(pool.calls[3][0])
    pool.calls[3][2](RuntimeError("WorkerLostError"))
    assert ["m2"] == out.requeued
    assert ["m3"] == ids(pool.calls[4][0])
    pool.calls[4][1]([True])
    assert ["m4"] == ids(pool.calls[5][0])  # then batches as before
    pool.calls[5][1]([True])
    assert (["m0", "m1", "m3", "m4"], 0) == (out.acked, strategy.busy)


def test_a_lone_lost_message_is_given_up_when_on_lost_says_so() -> None:
    """Each time a message dies alone, ``on_lost`` is asked: back onto the queue while it
    says no, acknowledged (its document says why) once it says yes; nothing is asked for
    a message lost while the worker stops, nor when asking fails."""
    asked: list[str] = []
    answers = iter([False, True])

    def on_lost(item: Item) -> bool:
        asked.append(item.job["task_id"])
        return next(answers)

    batching.install(lambda items: [True] * len(items), on_lost)
    strategy, pool, out = make(processes=1)
    channel = Channel()
    out.deliver(strategy, Message("m1", channel))
    pool.calls[0][2](RuntimeError("WorkerLostError"))
    assert (["m1"], [], ["m1"]) == (asked, out.acked, out.requeued)
    out.deliver(strategy, Message("m1", channel))  # redelivered
    pool.calls[1][2](RuntimeError("WorkerLostError"))
    assert (["m1", "m1"], ["m1"], ["m1"]) == (asked, out.acked, out.requeued)

    def broken(item: Item) -> bool:
        raise ConnectionError("Redis away")

    batching.install(lambda items: [True] * len(items), broken)
    out.deliver(strategy, Message("m2", channel))
    pool.calls[2][2](RuntimeError("WorkerLostError"))
    assert ["m1", "m2"] == out.requeued
    asked.clear()
    answers = iter([True])
    batching.install(lambda items: [True] * len(items), on_lost)
    out.deliver(strategy, Message("m3", channel))
    batching.stop_soon()  # its process ends because the worker stops
    pool.calls[3][2](RuntimeError("WorkerLostError"))
    assert ([], ["m1", "m2", "m3"]) == (asked, out.requeued)


def test_a_batch_is_acknowledged_in_one_call_where_the_channel_allows() -> None:
    strategy, pool, out = make(processes=1)
    channel = Channel(with_ack_many=True)
    for n in range(4):
        out.deliver(strategy, Message(f"m{n}", channel))
    pool.calls[0][1]([True])  # one message: the usual acknowledgement
    pool.calls[1][1]([True, True, False])
    assert (["m0"], [["m1", "m2"]], ["m3"]) == (
        out.acked, channel.acked_together, out.requeued)


def test_messages_of_a_lost_broker_connection_are_left_alone() -> None:
    """kombu put them back when the connection dropped; acknowledging them on the dead
    channel would fail (and once stopped the worker)."""
    strategy, pool, out = make(processes=1)
    old = Channel(with_ack_many=True)
    for n in range(3):
        out.deliver(strategy, Message(f"m{n}", old))
    old.closed = True
    pool.calls[0][1]([True])
    pool.calls[1][1]([True, False])
    assert ([], [], []) == (out.acked, out.requeued, old.acked_together)
    assert 0 == strategy.busy


def test_a_message_that_is_not_a_job_is_set_aside_then_acknowledged(
    real_redis: redis.Redis, redis_url: str
) -> None:
    """A message whose body holds no job is written to the dead-letter list (why, and its
    body), then acknowledged: never handed to the pool, never dropped without a trace."""
    strategy, pool, out = make(redis_url=redis_url)
    out.deliver(strategy, Message("junk", Channel(), body=b"[[], {}, {}]"))
    out.deliver(strategy, Message("garbage", Channel(), body=b"\xff not json"))
    assert (["junk", "garbage"], [], []) == (out.acked, out.dropped, pool.calls)
    entries = [json.loads(e) for e in real_redis.lrange(keys.dead_letters(), 0, -1)]
    assert ["\ufffd not json", "[[], {}, {}]"] == [e["body"] for e in entries]
    assert {"not a postroom job"} == {e["reason"] for e in entries}


def test_a_message_not_set_aside_is_left_unacknowledged() -> None:
    """When Redis cannot take the dead letter, the message is neither acknowledged nor
    rejected: the broker hands it out again after its redelivery window."""
    strategy, pool, out = make()

    def unreachable() -> redis.Redis:
        raise redis.ConnectionError("Redis is away")

    strategy.dead_letters = DeadLetters(unreachable)
    out.deliver(strategy, Message("junk", Channel(), body=b"[[], {}, {}]"))
    assert ([], [], [], []) == (out.acked, out.dropped, out.requeued, pool.calls)


def test_after_a_shutdown_begins_nothing_more_is_handed_out() -> None:
    strategy, pool, out = make(processes=1)
    channel = Channel()
    out.deliver(strategy, Message("m0", channel))
    out.deliver(strategy, Message("m1", channel))
    batching.stop_soon()
    assert batching.stopping()
    pool.calls[0][1]([True])
    out.deliver(strategy, Message("m2", channel))
    assert (1, 2) == (len(pool.calls), len(strategy.waiting))


def test_the_stop_flag_is_new_for_each_install() -> None:
    batching.stop_soon()
    batching.install(lambda items: [])
    assert not batching.stopping()


def test_decode_body_reads_the_keyword_or_the_first_argument() -> None:
    job = {"task_id": "t", "solution_id": "s"}
    assert job == decode_body(json.dumps([[], {"job": job}, {}]))
    assert job == decode_body(json.dumps([[job], {}, {}]).encode())
    with pytest.raises(ValueError):
        decode_body(json.dumps([[{"x": 1}], {}, {}]))


def test_fits_window_leaves_room_for_the_longest_attempt() -> None:
    job = {"message": {"to": ["a@x.org", "b@x.org"], "cc": [], "bcc": ["c@x.org"]}}
    longest = attempt_bound_s(2.0, 3)
    item = Item(cast(Job, job), delivered_at=1000.0)
    window = longest + 10
    assert fits_window(item, 1000.0, 2.0, window)
    assert fits_window(item, 1009.9, 2.0, window)
    assert not fits_window(item, 1010.0, 2.0, window)


def test_messages_delivered_together_are_shared_among_the_free_processes() -> None:
    """Messages one broker step delivers (the channel says ``delivering``) are handed out
    when the step ends, shared evenly among the free processes (not the first alone)."""
    strategy, pool, out = make(processes=2, batch=4)
    channel = Channel()
    channel.delivering = True
    for n in range(6):
        out.deliver(strategy, Message(f"m{n}", channel))
    assert [] == pool.calls
    channel.delivering = False
    channel.after_delivery()
    assert [["m0", "m1", "m2"], ["m3", "m4", "m5"]] == [ids(c[0]) for c in pool.calls]


def test_an_answer_from_another_thread_is_settled_in_the_event_loop() -> None:
    """A thread pool calls back in its own threads: the verdicts wait for the loop."""
    hub = Hub()
    strategy, pool, out = make(processes=1, hub=hub)
    channel = Channel()
    out.deliver(strategy, Message("m0", channel))
    out.deliver(strategy, Message("m1", channel))
    answer = threading.Thread(target=pool.calls[0][1], args=([True],))
    answer.start()
    answer.join()
    assert ([], 1, 1) == (out.acked, len(hub.ready), strategy.busy)
    fn, args = hub.ready.pop()
    fn(*args)
    assert (["m0"], ["m1"]) == (out.acked, ids(pool.calls[1][0]))
    pool.calls[1][1]([True])  # from the loop's own thread: at once
    assert (["m0", "m1"], []) == (out.acked, hub.ready)


def test_a_pool_that_grows_gets_more_batches_at_once() -> None:
    """``--autoscale`` changes the number of pool processes while the worker runs."""
    strategy, pool, out = make(processes=1)
    channel = Channel()
    for n in range(3):
        out.deliver(strategy, Message(f"m{n}", channel))
    assert 1 == len(pool.calls)
    pool.num_processes = 2
    out.deliver(strategy, Message("m3", channel))
    assert [["m0"], ["m1", "m2", "m3"]] == [ids(items) for items, _, _ in pool.calls]
