"""Queued messages handed to the pool in batches, as many as wait when a process frees.

Celery's own path costs about a millisecond of CPU per message in the worker: a request
object, the trace, and one round trip through the pool's pipes for each message. Here the
main process keeps the messages the broker delivered in a buffer and gives a pool process
everything that waits (at most ``POSTROOM_WORKER_BATCH``) as soon as one is free. Under
light load a batch is one message and nothing waits; under heavy load batches grow, and the
per-message cost shrinks with them — the way a database commits a group of transactions.

Nothing about a message's guarantees changes:

* each message of a batch is acknowledged only when its attempt has written its fate down
  (:func:`postroom.worker.tasks.run`), and a message the batch did not come to is rejected back
  onto the queue;
* a pool process that dies takes no message with it: the messages of its batch are handed
  out again, each on its own (so one that kills its process every time takes no other
  down with it), and each message that was already sent is found in its ledger and not
  sent again; a lone message whose process dies goes back onto the queue, as with
  Celery's ``reject_on_worker_lost``, until that has happened
  :data:`postroom.worker.tasks.MAX_DEATHS` times: then its document ends ``failed`` (a message that
  kills its process every time is not handed out forever) and it is acknowledged;
* on a warm shutdown (SIGTERM) a batch finishes the message it is sending and starts no
  other; the rest go back onto the queue;
* a batch starts no message that could not finish inside the broker's redelivery window
  counted from when that message was delivered (:func:`fits_window`); such a message goes
  back onto the queue instead, so a slow relay never makes the broker hand out again a
  message that is still being sent.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from multiprocessing.sharedctypes import RawValue
from typing import Any

from postroom.shared.celery_wire.dead_letters import DeadLetters
from postroom.shared.celery_wire.task_message import decode_message
from postroom.shared.records import Job
from postroom.worker.lease import attempt_bound_s

log = logging.getLogger("postroom.worker")

@dataclass(frozen=True)
class Item:
    """One message as it travels to a pool process: the job and when it was delivered."""

    job: Job
    delivered_at: float

    def __repr__(self) -> str:  # Celery logs what it hands the pool: ids, never content
        return f"Item(task_id={self.job.get('task_id')!r}, delivered_at={self.delivered_at!r})"


def fits_window(item: Item, now: float, smtp_timeout_s: float, window_s: float,
                deadline_s: float | None = None) -> bool:  # fmt: skip
    """Whether one attempt at ``item`` started ``now`` surely ends inside the redelivery
    window that began when the broker delivered it.

    The broker's clock starts a few milliseconds before ``delivered_at`` (kombu records
    the delivery, then hands the message over); the bound's Redis allowance
    (``BOOKKEEPING_S``) covers that. A message started as soon as it arrives always fits,
    since ``check_timeouts`` holds the window longer than the longest attempt."""
    msg = item.job["message"]
    recipients = len(msg.get("to") or ()) + len(msg.get("cc") or ()) + len(msg.get("bcc") or ())
    bound = attempt_bound_s(smtp_timeout_s, recipients, deadline_s)
    return (now - item.delivered_at) + bound < window_s


class StopFlag:
    """Raised in the main process when a warm shutdown begins, seen at once by every pool
    process: a byte of shared memory made before the pool forks (no lock, so the signal
    handler that raises it can never wait on one)."""

    def __init__(self) -> None:
        self._value = RawValue("b", 0)

    def raise_(self) -> None:
        self._value.value = 1

    def __bool__(self) -> bool:
        return bool(self._value.value)


# Set when the app is built, before the pool forks, so each pool process inherits them: the
# batch runner (``runner(items) -> [True to acknowledge, False to requeue]``) and the flag.
_runner: Callable[[list[Item]], list[bool]] | None = None
_stop: StopFlag | None = None
# In the main process: told of a message that ended a batch of its own without an answer
# (its process died); True when it is given up (its document says so: acknowledge it).
_on_lost: Callable[[Item], bool] | None = None


def install(
    runner: Callable[[list[Item]], list[bool]],
    on_lost: Callable[[Item], bool] | None = None,
) -> None:
    """Make ``runner`` the batch runner of this worker, with a stop flag of its own;
    ``on_lost(item)`` judges a message whose process died under it alone (True: give it
    up and acknowledge it, False: back onto the queue)."""
    global _runner, _stop, _on_lost
    _runner = runner
    _stop = StopFlag()
    _on_lost = on_lost


def stopping() -> bool:
    return bool(_stop)


def stop_soon(**_: Any) -> None:
    """The worker is shutting down (Celery's ``worker_shutting_down``): batches start no
    more messages, and what waits in the buffer is not handed out; those messages go back
    onto the queue (rejected, or restored when the broker connection closes)."""
    if _stop is not None:
        _stop.raise_()


def run_batch(items: list[Item]) -> list[bool]:
    """What a pool process runs (a module-level function, so the pool can name it)."""
    if _runner is None:  # pragma: no cover - a wiring error, not a runtime state
        raise RuntimeError("postroom.worker.batching.install() was not called")
    return _runner(items)


@dataclass(eq=False)  # compared by identity
class _Waiting:
    item: Item
    message: Any
    ack: Callable[..., Any]
    reject: Callable[..., Any]
    # from a batch that ended without an answer: handed out on its own from now on
    alone: bool = False


class BatchStrategy:
    """Celery's task strategy for ``postroom.send_email`` (``Task.Strategy``): called in the
    worker's main process with each message the broker delivers."""

    def __init__(self, task: Any, app: Any, consumer: Any, **_: Any) -> None:
        self.pool = consumer.pool
        self.connection_errors = consumer.connection_errors
        # the worker's event loop: the buffer and the broker channel are touched only there
        self.hub = getattr(consumer, "hub", None)
        self.batch_max = max(1, int(app.conf.get("postroom_worker_batch", 1)))
        self.waiting: deque[_Waiting] = deque()
        self.busy = 0
        self.dead_letters = DeadLetters.for_app(app)

    def __call__(self, message: Any, payload: Any, ack: Any, reject: Any,
                 callbacks: Any = None, **_: Any) -> None:
        try:
            job = decode_message(message)
        except (ValueError, TypeError, KeyError, IndexError) as exc:
            # set aside in Redis, then acknowledged; left unacknowledged if Redis failed
            if self.dead_letters.set_aside(message, "not a postroom job", exc):
                ack(log, self.connection_errors)
            return
        self.waiting.append(_Waiting(Item(job, time.time()), message, ack, reject))
        channel: Any = getattr(message, "channel", None)
        if getattr(channel, "delivering", False):
            # the broker is delivering what one step took (celery_wire.redis_transport): hand it
            # out when the step ends, shared among the free processes, not the first alone
            channel.after_delivery = self.dispatch
            return
        self.dispatch()

    def dispatch(self) -> None:
        """Hand what waits to free pool processes, shared evenly among them, at most
        ``batch_max`` messages each."""
        while self.waiting and self.busy < self._slots() and not stopping():
            share = -(-len(self.waiting) // (self._slots() - self.busy))  # rounded up
            size = min(self.batch_max, share)
            batch = [self.waiting.popleft()]
            while (not batch[0].alone and self.waiting and len(batch) < size
                   and not self.waiting[0].alone):
                batch.append(self.waiting.popleft())
            self.busy += 1
            log.debug("a batch of %d handed to the pool", len(batch))
            self.pool.apply_async(
                run_batch,
                ([w.item for w in batch],),
                callback=partial(self._done, batch),
                error_callback=partial(self._lost, batch),
            )

    def _slots(self) -> int:
        """Pool processes now (``--autoscale`` changes their number)."""
        return max(1, int(getattr(self.pool, "num_processes", None) or 1))

    def _in_loop(self, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn`` in the worker's event loop: at once from the loop's own thread (the
        prefork pool calls back there), else handed to it (a thread pool's callbacks run
        in its threads; kombu's channel and this buffer are not for them)."""
        if self.hub is not None and threading.current_thread() is not threading.main_thread():
            self.hub.call_soon(fn, *args)
        else:
            fn(*args)

    def _done(self, batch: list[_Waiting], verdicts: Any) -> None:
        self._in_loop(self._done_now, batch, verdicts)

    def _lost(self, batch: list[_Waiting], exc_info: Any) -> None:
        self._in_loop(self._lost_now, batch, exc_info)

    def _done_now(self, batch: list[_Waiting], verdicts: Any) -> None:
        self.busy -= 1
        ok = verdicts if isinstance(verdicts, list) else []
        done: list[_Waiting] = []
        back: list[_Waiting] = []
        for i, waiting in enumerate(batch):  # no verdict (a short answer): back
            (done if i < len(ok) and ok[i] else back).append(waiting)
        self._settle(done, back)

    def _lost_now(self, batch: list[_Waiting], exc_info: Any) -> None:
        """The pool process died or the batch raised. A single message goes back onto the
        queue (as Celery's ``reject_on_worker_lost`` would). The messages of a larger
        batch are handed out again here, each on its own and first in line: one that
        kills its process every time then takes no other message down with it, and those
        already sent are found in their ledgers and only acknowledged."""
        self.busy -= 1
        exc = getattr(exc_info, "exception", exc_info)
        if len(batch) > 1:
            log.warning("a batch of %d ended without an answer (%s); its messages are "
                        "handed out again one by one", len(batch), type(exc).__name__)
            for waiting in reversed(batch):
                waiting.alone = True
                self.waiting.appendleft(waiting)
            self._settle([], [])
            return
        if self._given_up(batch[0].item):
            log.error("a message ended its batch without an answer (%s) once too often; it "
                      "is not tried again", type(exc).__name__)
            self._settle(batch, [])
            return
        log.warning("a message ended its batch without an answer (%s); it goes back onto "
                    "the queue", type(exc).__name__)
        self._settle([], batch)

    @staticmethod
    def _given_up(item: Item) -> bool:
        """Whether ``on_lost`` gives the message up; never while the worker stops (its
        processes are ended, not the message's fault), and not when it fails (then the
        message goes back onto the queue, as before)."""
        if _on_lost is None or stopping():
            return False
        try:
            return bool(_on_lost(item))
        except Exception:
            log.exception("could not count a lost message; it goes back onto the queue")
            return False

    def _settle(self, done: list[_Waiting], back: list[_Waiting]) -> None:
        """Acknowledge ``done``, put ``back`` onto the queue, hand out what waits. Runs in
        the worker's event loop: it never raises (a failure here would stop the worker),
        and a message it cannot settle is redelivered after the window (its ledger then
        tells what happened)."""
        try:
            # after a lost broker connection kombu has put the messages back already
            stale = [w for w in done + back if getattr(w.message.channel, "closed", False)]
            if stale:
                log.info("%d messages of a batch were returned to the queue when the "
                         "broker connection was lost", len(stale))
                done = [w for w in done if w not in stale]
                back = [w for w in back if w not in stale]
            if back:
                log.info("%d messages of a batch go back onto the queue", len(back))
            for waiting in back:
                waiting.reject(log, self.connection_errors, True)
            self._acknowledge(done)
        except Exception:
            log.exception("could not settle a batch; its messages come back after the "
                          "redelivery window")
        self.dispatch()

    def _acknowledge(self, done: list[_Waiting]) -> None:
        """One round trip for the batch on postroom's Redis transport
        (:meth:`postroom.shared.celery_wire.redis_transport.Channel.ack_many`), else one
        acknowledgement each."""
        channel: Any = done[0].message.channel if done else None
        if len(done) > 1 and hasattr(channel, "ack_many") and all(
            w.message.channel is channel for w in done
        ):
            try:
                channel.ack_many([w.message for w in done])
            except self.connection_errors as exc:
                # as kombu's own ack_log_error: the messages come back after the
                # redelivery window, and their ledgers say they were sent
                log.critical("could not acknowledge %d messages (%r)", len(done), exc)
            return
        for waiting in done:
            waiting.ack(log, self.connection_errors)
