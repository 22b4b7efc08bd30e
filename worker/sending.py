"""One attempt at a job: load → limit → send → record.

The task document says where the message is; the ledger says what happened on the
wire. Each path below ends in exactly one of: the document final (``sent``/``failed``),
or the job parked in the schedule with the document ``retrying``/``deferred``.

Redis is met in three steps (:mod:`postroom.worker.attempt_store`): ``begin`` (lease, document,
ledger,
solution), the hLimit take (which marks the attempt ``sending``), and ``finish`` (ledger,
document, lease, schedule or accepted set, counters). What the relay answered is kept in
:class:`~postroom.worker.ledger.Outcomes` until ``finish`` has written it down.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from postroom.shared.documents import FINAL, new_document
from postroom.shared.errors import (
    Blocked,
    InternalError,
    PermanentSendError,
    PostroomError,
    RateLimited,
    SmtpRejected,
    SmtpUnavailable,
    TransientSendError,
)
from postroom.shared.keys import ledger as ledger_key
from postroom.shared.ratelimit import Decision
from postroom.shared.records import Job, TaskDocument
from postroom.shared.relays import Relay
from postroom.shared.solutions import Solution, iso
from postroom.worker import metrics
from postroom.worker.attempt_store import (
    BeginCall,
    Begun,
    FirstTake,
    begin,
    begun_from_answer,
    finish,
    prepare_begin,
)
from postroom.worker.lease import attempt_bound_s, send_deadline_s
from postroom.worker.ledger import LedgerState, Outcomes
from postroom.worker.message import attachments_of, build_message
from postroom.worker.outcomes import retry_hint
from postroom.worker.resources import WorkerContext
from postroom.worker.smtp import DeliveryResult

log = logging.getLogger("postroom.worker")

# how long a deferred message (hLimit_policy "defer") may wait for a token
MAX_DEFER_S = 3600.0
# the ledger's reply for a recipient put on the suppression list after intake (no SMTP code:
# not a bounce)
SUPPRESSED = "not sent: on the suppression list"


#: a relay and, for a caller-chosen one, the address to connect to; or the error refusing it
Judged = tuple[Relay, str | None] | PostroomError


def _rejected(code: int | None, reply: str | None) -> dict[str, Any]:
    return {"status": "rejected", "code": code, "reply": reply}


def recipients_of(job: Job) -> list[str]:
    msg = job["message"]
    seen: dict[str, None] = {}
    for addr in [*msg["to"], *msg["cc"], *msg["bcc"]]:
        seen.setdefault(addr, None)
    return list(seen)


class Attempt:
    """Runs one delivery attempt of ``job`` with the services of ``ctx``."""

    def __init__(self, ctx: WorkerContext, job: Job) -> None:
        self.ctx = ctx
        self.job = job
        self.sid: str = job["solution_id"]
        self.task_id: str = job["task_id"]
        self.recipients = recipients_of(job)
        self.log_extra = {"task_id": self.task_id, "solution_id": self.sid}
        # whether this attempt holds the message's lease now
        self._leased = False
        # what the relay answered and the ledger does not say yet (kept when the attempt is
        # run again after a Redis error), and the rejections not yet counted as bounces
        self._unrecorded: Outcomes | None = None
        self._bounces: dict[str, dict[str, Any]] = {}
        #: the attempt to begin in the same round trip as this one's last step (the next
        #: message of a batch), and whether this one may begin now; set by the batch runner
        self.next: Attempt | None = None
        self.ready: Callable[[], bool] = lambda: True
        # what that round trip began for this attempt: its relay's judgment and the begin
        self._ahead: tuple[Judged, Begun] | None = None

    # -- the whole attempt ----------------------------------------------------------

    def run(self) -> None:
        ctx = self.ctx
        if self._ahead is not None:  # begun with the previous message's last step
            (relay, begun), self._ahead = self._ahead, None
        else:
            relay, first_take = self._judged_and_take()
            begun = begin(
                ctx, self.sid, self.task_id, self._lease_seconds(), first_take, self.recipients
            )
        self._leased = begun.leased
        doc = begun.doc
        if doc is None:  # expired, or lost with the result backend: start it again
            doc = new_document(self.task_id, self.sid, self.job["created_at"],
                               self.job.get("metadata"))
        if doc["state"] in FINAL:
            log.info("already final; nothing to do", extra=self.log_extra)
            finish(ctx, self.job, release=self._leased, forget=True)
            self._leased = False
            self._count_bounces()
            return
        if not begun.leased:
            # another worker is sending it now: look again when its lease would end
            ctx.schedule.add(self.job, time.time() + begun.lease_left_s + 1.0)
            log.info("held by another worker; rescheduled", extra=self.log_extra)
            return
        try:
            state = self._with_unrecorded(begun.ledger)
            self._attempt(doc, state, begun.solution, relay, begun.take, begun.suppressed)
        finally:
            if self._leased:  # finish releases it; not reached, or it failed
                ctx.leases.release(self.sid, self.task_id)
                self._leased = False

    def _judged_and_take(self) -> tuple[Judged, FirstTake | None]:
        """The relay's judgment, made before the lease is taken so that a first attempt may
        take its token in the same step (a refused relay takes none: the message fails),
        and that take."""
        relay = self._judged_relay()
        first_take = None
        if not isinstance(relay, PostroomError) and self.recipients:
            settings = self.ctx.settings
            first_take = FirstTake(settings.hlimit_period_s, self.job.get("hlimit"),
                                   self.ctx.ledger.ttl_s, settings.hlimit_default)
        return relay, first_take

    def begin_call(self) -> tuple[Judged, BeginCall] | None:
        """This attempt's first step, ready to run with another's last (:meth:`_write`);
        None when it may not begin now (:attr:`ready`) or cannot begin so (see
        :func:`postroom.worker.attempt_store.prepare_begin`)."""
        if not self.ready():
            return None
        relay, first_take = self._judged_and_take()
        call = prepare_begin(self.ctx, self.sid, self.task_id, self._lease_seconds(),
                           first_take, self.recipients)  # fmt: skip
        return None if call is None else (relay, call)

    def begun_with(self, relay: Judged, call: BeginCall, answer: Any) -> None:
        """Keep what the previous attempt's last step began for this one (unless its answer
        is not to be used: then :meth:`run` begins as usual)."""
        begun = begun_from_answer(self.ctx, call, answer)
        self._ahead = None if begun is None else (relay, begun)

    def drop_ahead(self) -> None:
        """This attempt will not run now (its message goes back to the queue): give back a
        lease taken for it ahead. The token it took stays taken, once for the message, as
        after a crash."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[1].leased:
            self.ctx.leases.release(self.sid, self.task_id)

    def _deadline_seconds(self) -> float:
        """How long this attempt's SMTP exchange may take (``POSTROOM_SEND_DEADLINE_S``)."""
        settings = self.ctx.settings
        return send_deadline_s(settings.smtp_timeout_s, len(self.recipients),
                               settings.send_deadline_s)  # fmt: skip

    def _lease_seconds(self) -> float:
        settings = self.ctx.settings
        return attempt_bound_s(settings.smtp_timeout_s, len(self.recipients),
                               settings.send_deadline_s)  # fmt: skip

    def crashed(self, exc: BaseException) -> None:
        """An unexpected error ended the attempt: the document ends ``failed`` with an
        ``InternalError`` (never left ``queued`` for good), unless it is final already."""
        found = self._unfinished()
        if found is not None:
            err = InternalError(f"the worker met an unexpected error ({type(exc).__name__})")
            self._fail(*found, err)

    def give_up(self, err: PostroomError) -> None:
        """No more attempts: the document ends ``failed`` with ``err``, unless it is final
        already, or the ledger has every recipient done (then it ends as the ledger says)."""
        found = self._unfinished()
        if found is None:
            return
        doc, state = found
        if not state.pending(self.recipients):
            self._finish(doc, state)
        else:
            self._fail(doc, state, err)

    def _unfinished(self) -> tuple[TaskDocument, LedgerState] | None:
        """The document (made again if it was lost) and the ledger's state, or None when the
        document is final already."""
        doc = self.ctx.documents.get(self.sid, self.task_id)
        if doc is None:
            doc = new_document(self.task_id, self.sid, self.job["created_at"],
                               self.job.get("metadata"))
        if doc["state"] in FINAL:
            return None
        return doc, self._with_unrecorded(self.ctx.ledger.load(self.sid, self.task_id))

    def _attempt(
        self,
        doc: TaskDocument,
        state: LedgerState,
        solution: Solution | None,
        judged: Judged,
        taken: Decision | None,
        suppressed: list[str],
    ) -> None:
        ctx = self.ctx
        # the ledger keeps the count when the document was lost with the result backend
        doc["attempts"] = max(int(doc.get("attempts", 0)), state.attempts)
        pending = state.pending(self.recipients)
        if not pending:  # a redelivered job whose message was already sent
            self._finish(doc, state)
            return
        if solution is None:
            self._fail(doc, state, PermanentSendError("the solution no longer exists"))
            return
        if isinstance(judged, PostroomError):
            self._fail(doc, state, judged)
            return
        relay, connect_host = judged
        blocked = [r for r in pending if r in suppressed]
        if blocked:  # put on the suppression list since the message was accepted
            state = self._note(state, {r: _rejected(None, SUPPRESSED) for r in blocked})
            pending = state.pending(self.recipients)
            if not pending:
                self._suppressed(doc, state, blocked)
                return

        # the token, and the ledger's note that this attempt is under way, in one step
        # (made by begin already for a first attempt: then attempt is 1)
        attempt = int(doc["attempts"]) + 1
        decision = taken if taken is not None else ctx.bucket.take(
            self.sid,
            solution.hlimit(ctx.settings.hlimit_default),
            self.job.get("hlimit"),
            once_key=ledger_key(self.sid, self.task_id),
            attempt=attempt,
            ledger_ttl_s=ctx.ledger.ttl_s,
        )
        if not decision.allowed:
            self._limited(doc, state, solution, decision.retry_after, decision.limit)
            return

        msg = self.job["message"]
        try:
            parts = attachments_of(ctx.state, self.job)
        except PermanentSendError as err:
            self._fail(doc, state, err)
            return
        data = build_message(
            sender=msg["from"],
            to=msg["to"],
            cc=msg["cc"],
            subject=msg.get("subject"),
            text=msg.get("text"),
            html=msg.get("html"),
            message_id=self.job["message_id"],
            reply_to=msg.get("reply_to", ()),
            headers=msg.get("headers"),
            attachments=parts,
        )
        doc["attempts"] = attempt
        log.info(
            "sending",
            extra={**self.log_extra, "attempt": doc["attempts"], "recipients": len(pending)},
        )
        try:
            result = metrics.deliver(
                ctx.pool,
                relay,
                connect_host=connect_host,
                sender=msg["from"],
                recipients=pending,
                data=data,
                timeout=ctx.settings.smtp_timeout_s,
                ssl_context=ctx.ssl_context,
                local_hostname=ctx.local_hostname,
                deadline=time.monotonic() + self._deadline_seconds(),
            )
        except TransientSendError as err:
            # recipients refused for good in the same transaction are done
            rejections = {r: _rejected(*reply) for r, reply in err.rcpt_rejections.items()}
            self._retry(doc, self._note(state, rejections), err)
            return
        except SmtpRejected as err:
            # a 5xx to RCPT TO is that address's bounce; a 5xx to MAIL FROM or to the
            # message (a content filter, say) is no fault of the addresses: no code
            # is recorded for them, so they do not count toward suppression
            reply = err.extra.get("smtp_response")
            rejected = {r: _rejected(*err.rcpt_rejections.get(r, (None, reply))) for r in pending}
            self._fail(doc, self._note(state, rejected), err)
            return
        except PermanentSendError as err:
            self._fail(doc, self._note(state, {}), err)
            return
        self._delivered(doc, state, result)

    def _note(
        self,
        state: LedgerState,
        outcomes: dict[str, dict[str, Any]],
        response: str | None = None,
    ) -> LedgerState:
        """Keep what the relay answered for the ledger (written by the attempt's last step)
        and for the bounce counts; returns the ledger's state once it is written."""
        if self._unrecorded is None:
            self._unrecorded = Outcomes()
        self._unrecorded.add(outcomes, response)
        self._bounces.update(outcomes)
        return state.after(Outcomes(outcomes, response))

    def _with_unrecorded(self, state: LedgerState) -> LedgerState:
        return state if self._unrecorded is None else state.after(self._unrecorded)

    def _count_bounces(self) -> None:
        if self._bounces:
            self.ctx.suppressions.record_bounces(self.sid, self._bounces, self.task_id)
            self._bounces = {}

    def _delivered(self, doc: TaskDocument, state: LedgerState, result: DeliveryResult) -> None:
        outcomes = {r: {"status": "accepted", "code": 250, "reply": None} for r in result.accepted}
        for addr, code, reply in result.rejected:
            outcomes[addr] = _rejected(code, reply)
        state = self._note(state, outcomes, result.response or None)
        if result.deferred:
            _, code, reply = result.deferred[0]
            deferred = TransientSendError(
                "some recipients were deferred by the relay",
                retry_after=retry_hint(reply),
                smtp_code=code,
                smtp_response=reply,
            )
            self._retry(doc, state, deferred)
            return
        self._finish(doc, state)

    # -- outcomes ---------------------------------------------------------------------

    def _judged_relay(self) -> Judged:
        """The relay and, for a caller-chosen one, the address the guard allows connecting
        to (:class:`~postroom.shared.guard.RelayGuard`), or the error that refuses it."""
        try:
            relay = self._relay()
            if not relay.caller_chosen:
                return relay, None
            return relay, self.ctx.guard.check(relay.host, relay.port, relay.scheme)
        except PostroomError as err:
            return err

    def _relay(self) -> Relay:
        relay = Relay.of_job(self.job.get("relay"), self.ctx.default_relay, self.ctx.box.decrypt)
        if relay is None:
            raise PermanentSendError(
                "no relay: the request names none and POSTROOM_DEFAULT_SMTP_URL is not set"
            )
        return relay

    def _result(self, state: LedgerState) -> dict[str, Any]:
        msg = self.job["message"]
        return {
            "status": 204,
            "accepted": state.with_status("accepted", self.recipients),
            "rejected": state.with_status("rejected", self.recipients),
            "envelope": {"from": msg["from"], "to": self.recipients},
            "response": state.response,
            "messageId": self.job["message_id"],
        }

    def _finish(self, doc: TaskDocument, state: LedgerState) -> None:
        if not state.with_status("accepted", self.recipients):
            first = next(iter(state.done.values()), {})
            err = SmtpRejected(
                "every recipient was rejected",
                smtp_code=first.get("code"),
                smtp_response=first.get("reply"),
            )
            self._fail(doc, state, err)
            return
        doc.update({
            "state": "sent",
            "result": self._result(state),
            "error": None,
            "next_attempt_at": None,
            "pending": [],
        })
        self._write(doc, "sent")

    def _suppressed(self, doc: TaskDocument, state: LedgerState, blocked: list[str]) -> None:
        """Every recipient left is on the suppression list: sent, when earlier attempts
        reached others; else failed, ``Blocked`` (the 429 intake would have answered)."""
        if state.with_status("accepted", self.recipients):
            self._finish(doc, state)
            return
        self._fail(doc, state, Blocked.recipients(blocked))

    def _fail(self, doc: TaskDocument, state: LedgerState, err: PostroomError) -> None:
        doc.update({
            "state": "failed",
            "result": self._result(state) if state.done else None,
            "error": err.body(),
            "next_attempt_at": None,
            "pending": [],
        })
        self._write(doc, "failed", error_type=err.type)

    def _retry(self, doc: TaskDocument, state: LedgerState, err: TransientSendError) -> None:
        ctx = self.ctx
        age = time.time() - float(self.job["created_at"])
        delay = ctx.retry_policy.next_delay(int(doc["attempts"]), age, err.retry_after)
        pending = state.pending(self.recipients)
        if delay is None:
            spent = _rejected(err.extra.get("smtp_code"), "retry budget spent")
            state = self._note(state, {r: spent for r in pending})
            final = SmtpUnavailable(
                f"gave up after {doc['attempts']} attempts: {err.message}",
                **{k: v for k, v in err.extra.items() if k in ("smtp_code", "smtp_response")},
            )
            # when others got it, the message is sent and the rest are listed as rejected
            if state.with_status("accepted", self.recipients):
                self._finish(doc, state)
            else:
                self._fail(doc, state, final)
            return
        due = time.time() + delay
        doc.update({
            "state": "retrying",
            "next_attempt_at": iso(due),
            "error": err.body(),
            "pending": pending,
            "result": self._result(state) if state.done else None,
        })
        self._write(doc, "retrying", schedule_at=due, delay=round(delay, 3))

    def _limited(
        self,
        doc: TaskDocument,
        state: LedgerState,
        solution: Solution,
        retry_after: float | None,
        limit: int,
    ) -> None:
        """No token now. Under ``reject``, or for hLimit 0 whatever the policy: failed,
        ``RateLimited``. Under ``defer``: hold the next token in line for this message (a
        reservation in the bucket) and park the job until that slot; failed at once when
        the slot would come later than ``MAX_DEFER_S`` after the request.

        Each waiting message has its own slot, one refill interval after the one before,
        so the line drains in order with one wake-up per token, rather than every waiting
        message waking when the next token frees and all but one going back to sleep.
        """
        ctx = self.ctx
        message = "the hourly sending limit (hLimit) is used up"
        if retry_after is None or solution.policy != "defer":
            self._fail(doc, state, RateLimited(message, retry_after=retry_after, hLimit=limit))
            return
        left = MAX_DEFER_S - (time.time() - float(self.job["created_at"]))
        key = ledger_key(self.sid, self.task_id)
        capacity = solution.hlimit(ctx.settings.hlimit_default)
        held = ctx.bucket.reserve(
            self.sid, capacity, self.job.get("hlimit"), once_key=key, within_s=left
        )
        if held.retry_after is None or not (held.allowed or held.reserved):
            if held.retry_after is not None:
                message += f"; no token frees within {MAX_DEFER_S:.0f} s of the request"
            err = RateLimited(message, retry_after=held.retry_after, hLimit=held.limit)
            self._fail(doc, state, err)
            return
        # the reservation is in the ledger, which gets the document's time to live below
        due = time.time() + held.retry_after
        doc.update({"state": "deferred", "next_attempt_at": iso(due), "error": None})
        self._write(doc, "deferred", schedule_at=due, retry_after=round(held.retry_after, 3))

    def _write(
        self,
        doc: TaskDocument,
        transition: str,
        schedule_at: float | None = None,
        **fields: Any,
    ) -> None:
        """The attempt's last step: the ledger (what the relay answered), the document, the
        lease, and the job parked until ``schedule_at`` or, final, out of the accepted set;
        and, in the same round trip, the first step of :attr:`next`."""
        following = self.next
        ahead = following.begin_call() if following is not None else None
        answer = finish(
            self.ctx,
            self.job,
            doc=doc,
            transition=transition,
            outcomes=self._unrecorded,
            release=self._leased,
            schedule_at=schedule_at,
            forget=doc["state"] in FINAL,
            then=None if ahead is None else ahead[1],
        )
        if following is not None and ahead is not None:
            following.begun_with(*ahead, answer)
        metrics.written(transition, doc, self.job)
        self._leased = False
        self._unrecorded = None
        log.info(transition, extra={**self.log_extra, **fields})
        self._count_bounces()
