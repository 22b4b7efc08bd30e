"""One attempt at a job: load → limit → send → record.

The task document says where the message is; the ledger says what happened on the
wire. Each path below ends in exactly one of: the document final (``sent``/``failed``),
or the job parked in the schedule with the document ``retrying``/``deferred``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from shared.documents import FINAL, new_document
from shared.errors import (
    InternalError,
    NotFound,
    PermanentSendError,
    PostroomError,
    RateLimited,
    SmtpRejected,
    SmtpUnavailable,
    TransientSendError,
)
from shared.keys import ledger as ledger_key
from shared.keys import stats as stats_key
from shared.queue import forget_accepted
from shared.relays import Relay
from shared.solutions import iso
from worker.context import WorkerContext
from worker.lease import attempt_bound_s
from worker.ledger import LedgerState
from worker.message import build_message
from worker.outcomes import retry_hint
from worker.smtp import DeliveryResult

log = logging.getLogger("postroom.worker")

# how long a deferred message (hLimit_policy "defer") may wait for a token
MAX_DEFER_S = 3600.0


def _rejected(code: int | None, reply: str | None) -> dict[str, Any]:
    return {"status": "rejected", "code": code, "reply": reply}


def recipients_of(job: dict[str, Any]) -> list[str]:
    msg = job["message"]
    seen: dict[str, None] = {}
    for addr in [*msg["to"], *msg["cc"], *msg["bcc"]]:
        seen.setdefault(addr, None)
    return list(seen)


class Attempt:
    """Runs one delivery attempt of ``job`` with the services of ``ctx``."""

    def __init__(self, ctx: WorkerContext, job: dict[str, Any]) -> None:
        self.ctx = ctx
        self.job = job
        self.sid: str = job["solution_id"]
        self.task_id: str = job["task_id"]
        self.recipients = recipients_of(job)
        self.log_extra = {"task_id": self.task_id, "solution_id": self.sid}

    # -- the whole attempt ----------------------------------------------------------

    def run(self) -> None:
        ctx = self.ctx
        doc = ctx.documents.get(self.sid, self.task_id)
        if doc is None:  # expired, or lost with the result backend: start it again
            doc = new_document(self.task_id, self.sid, self.job["created_at"])
        if doc["state"] in FINAL:
            log.info("already final; nothing to do", extra=self.log_extra)
            forget_accepted(ctx.state, self.job)
            return
        lease_s = self._lease_seconds()
        if not ctx.leases.acquire(self.sid, self.task_id, lease_s):
            # another worker is sending it now: look again when its lease would end
            wait = ctx.leases.remaining_s(self.sid, self.task_id) + 1.0
            ctx.schedule.add(self.job, time.time() + wait)
            log.info("held by another worker; rescheduled", extra=self.log_extra)
            return
        try:
            self._attempt(doc)
        finally:
            ctx.leases.release(self.sid, self.task_id)

    def _lease_seconds(self) -> float:
        return attempt_bound_s(self.ctx.settings.smtp_timeout_s, len(self.recipients))

    def crashed(self, exc: BaseException) -> None:
        """An unexpected error ended the attempt: the document ends ``failed`` with an
        ``InternalError`` (never left ``queued`` for good), unless it is final already."""
        doc = self.ctx.documents.get(self.sid, self.task_id)
        if doc is None:
            doc = new_document(self.task_id, self.sid, self.job["created_at"])
        if doc["state"] in FINAL:
            return
        state = self.ctx.ledger.load(self.sid, self.task_id)
        err = InternalError(f"the worker met an unexpected error ({type(exc).__name__})")
        self._fail(doc, state, err)

    def _attempt(self, doc: dict[str, Any]) -> None:
        ctx = self.ctx
        state = ctx.ledger.load(self.sid, self.task_id)
        # the ledger keeps the count when the document was lost with the result backend
        doc["attempts"] = max(int(doc.get("attempts", 0)), state.attempts)
        pending = state.pending(self.recipients)
        if not pending:  # a redelivered job whose message was already sent
            self._finish(doc, state)
            return
        try:
            solution = ctx.solutions.get(self.sid)
        except NotFound:
            self._fail(doc, state, PermanentSendError("the solution no longer exists"))
            return

        decision = ctx.bucket.take(
            self.sid,
            solution.hlimit,
            self.job.get("hlimit"),
            once_key=ledger_key(self.sid, self.task_id),
        )
        if not decision.allowed:
            self._limited(doc, state, decision.retry_after, decision.limit, solution.policy)
            return

        try:
            relay = self._relay()
            connect_host = (
                ctx.guard.check(relay.host, relay.port, relay.scheme)
                if relay.caller_chosen
                else None
            )
        except PostroomError as err:
            self._fail(doc, state, err)
            return

        msg = self.job["message"]
        data = build_message(
            sender=msg["from"],
            to=msg["to"],
            cc=msg["cc"],
            subject=msg.get("subject"),
            text=msg.get("text"),
            html=msg.get("html"),
            message_id=self.job["message_id"],
        )
        doc["attempts"] += 1
        ctx.ledger.mark_sending(self.sid, self.task_id, doc["attempts"])
        log.info(
            "sending",
            extra={**self.log_extra, "attempt": doc["attempts"], "recipients": len(pending)},
        )
        try:
            result = ctx.pool.deliver(
                relay,
                connect_host=connect_host,
                sender=msg["from"],
                recipients=pending,
                data=data,
                timeout=ctx.settings.smtp_timeout_s,
                ssl_context=ctx.ssl_context,
                local_hostname=ctx.local_hostname,
            )
        except TransientSendError as err:
            # recipients refused for good in the same transaction are done
            self._record({r: _rejected(*reply) for r, reply in err.rcpt_rejections.items()})
            self._retry(doc, ctx.ledger.load(self.sid, self.task_id), err)
            return
        except SmtpRejected as err:
            # a 5xx to RCPT TO is that address's bounce; a 5xx to MAIL FROM or to the
            # message (a content filter, say) is no fault of the addresses: no code
            # is recorded for them, so they do not count toward suppression
            reply = err.extra.get("smtp_response")
            self._record(
                {r: _rejected(*err.rcpt_rejections.get(r, (None, reply))) for r in pending}
            )
            self._fail(doc, ctx.ledger.load(self.sid, self.task_id), err)
            return
        except PermanentSendError as err:
            self._record({})
            self._fail(doc, state, err)
            return
        self._delivered(doc, result)

    def _record(self, outcomes: dict[str, dict[str, Any]], response: str | None = None) -> None:
        self.ctx.ledger.record(self.sid, self.task_id, outcomes, response)
        self.ctx.suppressions.record_bounces(self.sid, outcomes, self.task_id)

    def _delivered(self, doc: dict[str, Any], result: DeliveryResult) -> None:
        outcomes = {r: {"status": "accepted", "code": 250, "reply": None} for r in result.accepted}
        for addr, code, reply in result.rejected:
            outcomes[addr] = _rejected(code, reply)
        self._record(outcomes, result.response or None)
        state = self.ctx.ledger.load(self.sid, self.task_id)
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

    def _relay(self) -> Relay:
        spec = self.job.get("relay")
        if spec:
            password = spec.get("password")
            return Relay(
                host=spec["host"],
                port=int(spec["port"]),
                scheme=spec["scheme"],
                user=spec.get("user"),
                password=self.ctx.box.decrypt(password) if password else None,
                caller_chosen=True,
            )
        relay = self.ctx.default_relay
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

    def _finish(self, doc: dict[str, Any], state: LedgerState) -> None:
        if not state.with_status("accepted", self.recipients):
            first = next(iter(state.done.values()), {})
            err = SmtpRejected(
                "every recipient was rejected",
                smtp_code=first.get("code"),
                smtp_response=first.get("reply"),
            )
            self._fail(doc, state, err)
            return
        doc.update(
            state="sent",
            result=self._result(state),
            error=None,
            next_attempt_at=None,
            pending=[],
        )
        self._write(doc, "sent")

    def _fail(self, doc: dict[str, Any], state: LedgerState, err: PostroomError) -> None:
        doc.update(
            state="failed",
            result=self._result(state) if state.done else None,
            error=err.body(),
            next_attempt_at=None,
            pending=[],
        )
        self._write(doc, "failed", error_type=err.type)

    def _retry(self, doc: dict[str, Any], state: LedgerState, err: TransientSendError) -> None:
        ctx = self.ctx
        age = time.time() - float(self.job["created_at"])
        delay = ctx.retry_policy.next_delay(int(doc["attempts"]), age, err.retry_after)
        pending = state.pending(self.recipients)
        if delay is None:
            spent = _rejected(err.extra.get("smtp_code"), "retry budget spent")
            self._record({r: spent for r in pending})
            state = ctx.ledger.load(self.sid, self.task_id)
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
        doc.update(
            state="retrying",
            next_attempt_at=iso(due),
            error=err.body(),
            pending=pending,
            result=self._result(state) if state.done else None,
        )
        self._write(doc, "retrying", delay=round(delay, 3))
        ctx.schedule.add(self.job, due)

    def _limited(
        self,
        doc: dict[str, Any],
        state: LedgerState,
        retry_after: float | None,
        limit: int,
        policy: str,
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
        if retry_after is None or policy != "defer":
            self._fail(doc, state, RateLimited(message, retry_after=retry_after, hLimit=limit))
            return
        try:
            solution = ctx.solutions.get(self.sid)
        except NotFound:
            self._fail(doc, state, PermanentSendError("the solution no longer exists"))
            return
        left = MAX_DEFER_S - (time.time() - float(self.job["created_at"]))
        key = ledger_key(self.sid, self.task_id)
        held = ctx.bucket.reserve(
            self.sid, solution.hlimit, self.job.get("hlimit"), once_key=key, within_s=left
        )
        if held.retry_after is None or not (held.allowed or held.reserved):
            if held.retry_after is not None:
                message += f"; no token frees within {MAX_DEFER_S:.0f} s of the request"
            err = RateLimited(message, retry_after=held.retry_after, hLimit=held.limit)
            self._fail(doc, state, err)
            return
        ctx.state.expire(key, ctx.settings.result_ttl)  # the reservation is in the ledger
        due = time.time() + held.retry_after
        doc.update(state="deferred", next_attempt_at=iso(due), error=None)
        self._write(doc, "deferred", retry_after=round(held.retry_after, 3))
        ctx.schedule.add(self.job, due)

    def _write(self, doc: dict[str, Any], transition: str, **fields: Any) -> None:
        pipe = self.ctx.results.pipeline(transaction=False)
        self.ctx.documents.put(doc, pipe=pipe)
        pipe.execute()
        if doc["state"] in FINAL:
            forget_accepted(self.ctx.state, self.job)
        self.ctx.state.hincrby(stats_key(), transition, 1)
        log.info(transition, extra={**self.log_extra, **fields})
