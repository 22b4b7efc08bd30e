"""Delivering the solutions' events to their webhook endpoints, inside ``postroom worker``.

Each worker instance runs one :class:`Deliverer` in its main process (a bootstep: no
process for operators to add): a loop that looks at every endpoint (``keys.webhook_endpoints``)
and takes its due events for a lease (``webhook_claim.lua``), and a pool of threads that
POST them (:mod:`postroom.worker.webhook_http`). The events go by the batch: one take per
endpoint per turn (at most :data:`BATCH` events per free slot), each slot's share POSTed
one after the other by one thread on one kept connection, and recorded by that thread in
one script (``webhook_finish.lua``), so that the take, the hand-off to a thread and the
round trip that records are shared by a batch's events, not paid per event
(``bench/profile_webhooks.py``; figures in ``docs/webhooks.md``).
The sends themselves run in the pool processes, which this never touches, so a slow
endpoint cannot hold up mail.

- Mail first: the delivering threads run at niceness 10 (Linux), so on a host whose CPU is
  all taken the sends keep their pace and the events catch up when it frees.
- Isolation: at most ``POSTROOM_WEBHOOK_ENDPOINT_CONCURRENCY`` POSTs in flight per endpoint,
  ``POSTROOM_WEBHOOK_CONCURRENCY`` in all: an endpoint that hangs holds its own slots for
  at most ``POSTROOM_WEBHOOK_TIMEOUT_S`` each, never the others'.
- At least once: an event leaves its endpoint's queue only when an attempt is recorded
  delivered or the last one failed. A worker killed mid-POST leaves the event claimed until
  its lease ends (the timeout and a margin); then any worker takes it again, with the same
  ``webhook-id``. The queues live in Redis: a Redis with persistence keeps them across a
  restart, like every other accepted thing.
- Retries: a non-2xx answer, a timeout or a refused connection is tried again after
  ``POSTROOM_WEBHOOK_RETRY_BASE_S`` × 4^(n-1) (at most ``POSTROOM_WEBHOOK_RETRY_MAX_DELAY_S``),
  jittered by ±20 %, up to ``POSTROOM_WEBHOOK_MAX_ATTEMPTS`` attempts. An endpoint whose
  every attempt failed for ``POSTROOM_WEBHOOK_DISABLE_AFTER_S`` is disabled (and says so).
"""

from __future__ import annotations

import json
import logging
import os
import random
import ssl
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import redis
from redis.exceptions import NoScriptError

from postroom.shared import keys
from postroom.shared.crypto import SecretBox
from postroom.shared.events import signature_header
from postroom.shared.guard import CachedResolver
from postroom.shared.redis_values import as_str
from postroom.shared.scripts import Lua, script
from postroom.shared.settings import Settings
from postroom.shared.solutions import iso
from postroom.shared.webhooks import LOG_SIZE, WebhookGuard, WebhookStore
from postroom.worker.webhook_http import KeptConnections, post

log = logging.getLogger("postroom.webhooks")

#: seconds a taken event stays taken beyond the POST's own timeout
LEASE_MARGIN_S = 5.0
USER_AGENT = "postroom-webhooks/1"
#: seconds between reads of the set of endpoints
ENDPOINTS_READ_S = 1.0
#: the niceness of the delivering threads (the pool processes that send mail keep 0)
NICE = 10
#: events taken at most per free slot of an endpoint, POSTed one after the other by one
#: thread: a few round trips and thread wake-ups per batch instead of per event
BATCH = 32
#: seconds a batch keeps its attempts before recording them (a slow endpoint's batch
#: records as it goes; a fast one's, once at its end)
RECORD_EVERY_S = 0.5

#: one script to run when the batch's attempts are recorded: the script, keys, arguments
Call = tuple[Lua, list[str], list[str | int]]


@dataclass(frozen=True)
class Claim:
    """Events taken from one endpoint in one step: whose, and the lease they are under."""

    endpoint: str
    sid: str
    wid: str
    record: dict[str, Any]
    #: the claim's ``now`` and lease (``webhook_claim.lua``'s ARGV[2] and ARGV[3])
    now: str
    lease: str
    #: ``time.monotonic()`` just before the claim
    taken_at: float


def lower_priority() -> None:
    """Run the calling thread at :data:`NICE` (Linux schedules threads one by one): when
    the host's CPU is all taken, sending mail comes first and events catch up after.
    Elsewhere, or when not permitted, the thread keeps its priority."""
    if not sys.platform.startswith("linux"):
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICE)
    except OSError:
        log.debug("webhook threads keep their priority")


def retry_delay(settings: Settings, attempt: int, rng: random.Random | None = None) -> float:
    """Seconds before the attempt after ``attempt`` (1-based): exponential, jittered."""
    base = min(settings.webhook_retry_base_s * 4 ** (attempt - 1),
               settings.webhook_retry_max_delay_s)  # fmt: skip
    return base * (rng or random).uniform(0.8, 1.2)


class Deliverer:
    """One worker instance's deliveries: :meth:`start` it, :meth:`stop` it."""

    def __init__(self, settings: Settings, client: redis.Redis) -> None:
        self.settings = settings
        self._r = client
        self._store = WebhookStore(client, SecretBox(settings.secret_key))
        self._guard = WebhookGuard(settings.webhook_allow_hosts, resolver=CachedResolver())
        self._ssl = ssl.create_default_context()
        self._pool = ThreadPoolExecutor(settings.webhook_concurrency,
                                        thread_name_prefix="postroom-webhook",
                                        initializer=lower_priority)  # fmt: skip
        self._lock = threading.Lock()
        self._in_flight: dict[str, int] = {}
        self._total = 0
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._claim = script("webhook_claim")
        self._finish = script("webhook_finish")
        self._release = script("webhook_release")
        self._secrets: dict[str, str] = {}
        self._kept = KeptConnections()
        #: attempts made and not yet recorded (:meth:`flush`)
        self._done: list[Call] = []
        self._endpoints: list[str] = []
        #: endpoints whose last take was as large as asked (more may be due)
        self._full: set[str] = set()
        self._endpoints_read = 0.0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="postroom-webhooks",
                                        daemon=True)  # fmt: skip
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop taking events; POSTs under way end within their timeout (what is left of
        them is taken again when its lease ends)."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._kept.close_all()

    # -- the loop -------------------------------------------------------------------

    def _loop(self) -> None:
        lower_priority()
        while not self._stopping.is_set():
            try:
                self.flush()
                backlog = self.take_due()
            except redis.RedisError as err:
                log.warning("webhook events not readable now: %s", type(err).__name__)
                backlog = False
            # with more due than was taken, look again as soon as a batch ends; else once
            # per poll: the events of that while go out together (a few round trips and
            # thread wake-ups for the lot, instead of each)
            if backlog:
                self._wake.wait(self.settings.webhook_poll_s)
            else:
                self._stopping.wait(self.settings.webhook_poll_s)
            self._wake.clear()
        try:
            self.flush()
        except redis.RedisError:
            pass  # not recorded: those events are taken again when their lease ends

    def flush(self) -> None:
        """Record what the threads could not (Redis did not answer then), in one round
        trip. Kept for the next flush when Redis still does not answer."""
        with self._lock:
            done, self._done = self._done, []
        if done:
            self._record(done)

    def _record(self, done: list[Call]) -> None:
        """Run the scripts of ``done`` (attempts ended, events given back) in one round
        trip; on a connection error they are kept for :meth:`flush` and it is raised."""
        pipe = self._r.pipeline(transaction=False)
        for lua, script_keys, args in done:
            lua.queue(pipe, script_keys, args)
        try:
            replies = pipe.execute(raise_on_error=False)
        except (redis.ConnectionError, redis.TimeoutError):
            with self._lock:
                self._done = done + self._done
            raise
        for (lua, script_keys, args), reply in zip(done, replies, strict=True):
            if isinstance(reply, NoScriptError):  # Redis restarted: load it, run it alone
                lua(self._r, script_keys, args)
            elif isinstance(reply, Exception):
                log.warning("webhook attempt not recorded: %s", reply)

    def take_due(self) -> bool:
        """Take the due events of every endpoint with a free slot, up to :data:`BATCH` per
        slot, and hand them to the threads in batches; whether some endpoint may have more
        due than was taken."""
        backlog = False
        for endpoint in self._endpoint_list():
            sid, _, wid = endpoint.partition("/")
            with self._lock:
                free = min(self.settings.webhook_endpoint_concurrency
                           - self._in_flight.get(endpoint, 0),
                           self.settings.webhook_concurrency - self._total)  # fmt: skip
            if free <= 0:  # busy: look again when a batch ends if it has more waiting
                backlog = backlog or endpoint in self._full
                continue
            taken_at, now = time.monotonic(), time.time()
            lease = self.settings.webhook_timeout_s + LEASE_MARGIN_S
            answer = self._claim(self._r, self._keys(sid, wid),
                                 [wid, repr(now), repr(lease), free * BATCH])  # fmt: skip
            if answer[0] is None:  # the endpoint is gone
                self._r.srem(keys.webhook_endpoints(), endpoint)
                self._endpoints_read = 0.0
                continue
            taken = [(as_str(answer[n]), answer[n + 1]) for n in range(1, len(answer), 2)]
            if len(taken) == free * BATCH:  # maybe more
                self._full.add(endpoint)
                backlog = True
            else:
                self._full.discard(endpoint)
            if not taken:
                continue
            record = json.loads(answer[0])
            claim = Claim(endpoint, sid, wid, record, repr(now), repr(lease), taken_at)
            # spread over every free slot: a slow endpoint keeps its POSTs in parallel
            parts = min(free, len(taken))
            with self._lock:
                self._in_flight[endpoint] = self._in_flight.get(endpoint, 0) + parts
                self._total += parts
            for k in range(parts):
                batch = taken[k * len(taken) // parts:(k + 1) * len(taken) // parts]
                self._pool.submit(self._deliver, claim, batch)
        return backlog

    def _endpoint_list(self) -> list[str]:
        """Every endpoint, read again at most every :data:`ENDPOINTS_READ_S` (a new one
        gets its first event within that)."""
        now = time.monotonic()
        if now - self._endpoints_read >= ENDPOINTS_READ_S:
            self._endpoints = sorted(as_str(m) for m in
                                     self._r.smembers(keys.webhook_endpoints()))  # fmt: skip
            self._endpoints_read = now
        return self._endpoints

    # -- one batch --------------------------------------------------------------------

    def _deliver(self, claim: Claim, batch: list[tuple[str, bytes]]) -> None:
        """POST the events of ``batch`` one after the other on one kept connection, then
        record them all in one round trip. A POST begins only while its end (at most the
        timeout later) falls within the lease: the events left when that time has passed
        are given back, due at once (``webhook_release.lua``)."""
        done: list[Call] = []
        attempts: list[str | int] = []
        recorded = time.monotonic()
        try:
            for n, (event_id, raw) in enumerate(batch):
                if n and time.monotonic() - claim.taken_at > LEASE_MARGIN_S:
                    done.append((self._release, self._keys(claim.sid, claim.wid),
                                 [claim.now, claim.lease, repr(time.time()),
                                  *(e for e, _ in batch[n:])]))  # fmt: skip
                    break
                attempts += self.post_once(claim.sid, claim.wid, claim.record, event_id,
                                           json.loads(raw))  # fmt: skip
                if time.monotonic() - recorded > RECORD_EVERY_S:  # a slow endpoint
                    call = self._finish_call(claim.sid, claim.wid, attempts)
                    attempts, recorded = [], time.monotonic()
                    self._record([call])
        except Exception:  # the rest stay taken until their lease ends, then are retried
            log.exception("webhook delivery not recorded", extra={"solution_id": claim.sid,
                                                                    "webhook_id": claim.wid})
        finally:
            if attempts:
                done.insert(0, self._finish_call(claim.sid, claim.wid, attempts))
            try:
                if done:
                    self._record(done)
            except redis.RedisError:
                pass  # kept: the loop records them when Redis answers again
            with self._lock:
                left = self._in_flight.get(claim.endpoint, 1) - 1
                if left:
                    self._in_flight[claim.endpoint] = left
                else:
                    self._in_flight.pop(claim.endpoint, None)
                self._total -= 1
            self._wake.set()

    def _finish_call(self, sid: str, wid: str, attempts: list[str | int]) -> Call:
        """``webhook_finish.lua`` for ``attempts`` (six arguments each, :meth:`post_once`)."""
        return (self._finish, self._keys(sid, wid),
                [wid, LOG_SIZE, self.settings.webhook_disable_after_s, *attempts])  # fmt: skip

    def attempt(self, sid: str, wid: str, record: dict[str, Any], event_id: str,
                pending: dict[str, Any]) -> None:  # fmt: skip
        """POST one event once and record what happened, now."""
        lua, script_keys, args = self._finish_call(
            sid, wid, self.post_once(sid, wid, record, event_id, pending))
        lua(self._r, script_keys, args)

    def post_once(self, sid: str, wid: str, record: dict[str, Any], event_id: str,
                  pending: dict[str, Any]) -> list[str | int]:  # fmt: skip
        """POST one event once; what ``webhook_finish.lua`` records of it (event id, end,
        outcome, when to try again, attempt, log entry)."""
        settings = self.settings
        attempt = int(pending.get("attempt", 0)) + 1
        body = str(pending["body"]).encode()
        stamp = int(time.time())
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            "webhook-id": event_id,
            "webhook-timestamp": str(stamp),
            "webhook-signature": signature_header(self._secrets_of(record), event_id, stamp,
                                                  body),  # fmt: skip
        }
        answer = post(record["url"], body, headers, guard=self._guard, ssl_context=self._ssl,
                      connect_timeout_s=settings.webhook_connect_timeout_s,
                      timeout_s=settings.webhook_timeout_s, kept=self._kept)  # fmt: skip
        now = time.time()
        if answer.delivered:
            outcome, next_at = "delivered", ""
        elif attempt >= settings.webhook_max_attempts:
            outcome, next_at = "give_up", ""
        else:
            outcome, next_at = "retry", repr(now + retry_delay(settings, attempt))
        entry = {
            "id": "dlv_" + uuid.uuid4().hex,
            "event_id": event_id,
            "type": pending.get("type"),
            "attempt": attempt,
            "status_code": answer.status,
            "error": answer.error,
            "at": iso(now),
        }
        if not answer.delivered:
            log.info("webhook attempt failed", extra={
                "solution_id": sid, "webhook_id": wid, "event_id": event_id,
                "attempt": attempt, "outcome": outcome, "error": answer.error})  # fmt: skip
        return [event_id, repr(now), outcome, next_at, attempt, json.dumps(entry)]

    def _secrets_of(self, record: dict[str, Any]) -> list[str]:
        """The secrets signing now (decrypted once per process and sealed value)."""
        now = time.time()
        out = []
        for s in record["secrets"]:
            if s.get("until") is not None and s["until"] <= now:
                continue
            sealed = s["sealed"]
            plain = self._secrets.get(sealed)
            if plain is None:
                if len(self._secrets) > 4096:
                    self._secrets.clear()
                plain = self._store.secrets_in_force({"secrets": [{"sealed": sealed}]})[0]
                self._secrets[sealed] = plain
            out.append(plain)
        return out

    @staticmethod
    def _keys(sid: str, wid: str) -> list[str]:
        return [keys.webhooks(sid), keys.webhook_due(sid, wid), keys.webhook_pending(sid, wid),
                keys.webhook_log(sid, wid)]  # fmt: skip
