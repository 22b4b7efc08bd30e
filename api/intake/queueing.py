"""The second step of a send checked apart: its job queued, with what must be in Redis first.

One transaction writes the first task document (``queued``, or ``scheduled`` with its
``send_at``), the task-list entry, the attachments' bytes and the accepted-set entry, and
publishes the job (:class:`postroom.shared.queue.Enqueuer`; a scheduled job goes to the schedule
instead). When the broker or Redis does not take it: 503, nothing left behind.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

from postroom.api import tasklist
from postroom.api.intake.job import recipients_of
from postroom.api.services import Services
from postroom.shared import attachments as stored_attachments
from postroom.shared.documents import new_document
from postroom.shared.records import Job
from postroom.shared.schemas.attachments import Attachment
from postroom.shared.solutions import iso


def queue(svc: Services, job: Job, attachments: Sequence[Attachment] = ()) -> None:
    """Write ``job``'s first document (and its attachments' bytes) and publish the job, or
    park it in the schedule until its ``send_at``; on failure, take the document back and
    raise (503). A scheduled job's document (and attachments) live
    ``POSTROOM_RESULT_TTL`` past its ``send_at``."""
    sid, task_id = job["solution_id"], job["task_id"]
    doc = new_document(task_id, sid, job["created_at"], job.get("metadata"))
    send_at = job.get("send_at")
    ttl_s = svc.documents.ttl_s
    if send_at is not None:
        doc.update({"state": "scheduled", "next_attempt_at": iso(send_at)})
        ttl_s += max(0, math.ceil(send_at - time.time()))
    # split kept (over 10 % on intake, docs/throughput.md): with the documents in the
    # state's Redis, the first document rides in the enqueue's transaction
    same = svc.one_redis

    def first_writes(pipe: Any) -> None:  # the document and its task-list entry
        svc.documents.put(doc, pipe=pipe, ttl_s=ttl_s)
        tasklist.add_to(pipe, sid, task_id, job["created_at"], recipients_of(job), ttl_s)

    def writes(pipe: Any) -> None:
        if same:
            first_writes(pipe)
        stored_attachments.queue_put(pipe, sid, task_id, attachments, ttl_s)

    try:
        if not same:
            pipe = svc.results.pipeline(transaction=True)
            first_writes(pipe)
            pipe.execute()
        if send_at is not None:
            svc.enqueuer.schedule(job, send_at, with_writes=writes)
        else:
            svc.enqueuer.enqueue(job, with_writes=writes if same or attachments else None)
    except Exception:
        svc.documents.delete(sid, task_id)
        if attachments:  # written beside the accepted entry, which the broker then refused
            stored_attachments.delete(svc.state, sid, task_id)
        raise
