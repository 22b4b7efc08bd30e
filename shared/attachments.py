"""Attachment bytes, stored once in postroom's Redis beside the task and referenced from
the job (which carries only each attachment's name, type, Content-ID and size): a broker
message never holds them.

The intake writes them in the same transaction that queues the job, with the task
document's time to live; the worker reads them when it builds the message; they are
deleted when the task is final (sent, failed, canceled) or expire with the document.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis

from postroom.shared import keys
from postroom.shared.errors import PermanentSendError
from postroom.shared.records import AttachmentMeta
from postroom.shared.schemas.attachments import Attachment


def queue_put(pipe: Any, sid: str, task_id: str, attachments: Sequence[Attachment],
              ttl_s: int) -> None:  # fmt: skip
    """Queue the writing of ``attachments`` (index -> bytes) on ``pipe``."""
    if not attachments:
        return
    key = keys.attachments(sid, task_id)
    pipe.hset(key, mapping={str(n): a.content for n, a in enumerate(attachments)})
    pipe.expire(key, ttl_s)


def load(client: redis.Redis, sid: str, task_id: str, metas: Sequence[AttachmentMeta]
         ) -> list[bytes]:  # fmt: skip
    """The bytes of a job's attachments, in order; a PermanentSendError when they are gone
    (expired with the document, or the task ended meanwhile)."""
    if not metas:
        return []
    found = client.hmget(keys.attachments(sid, task_id), [str(n) for n in range(len(metas))])
    if any(part is None for part in found):
        raise PermanentSendError("the message's attachments are no longer stored")
    return [part for part in found if isinstance(part, bytes)]


def delete(client: redis.Redis | Any, sid: str, task_id: str) -> None:
    """Delete a task's attachments (``client`` may be a pipeline)."""
    client.delete(keys.attachments(sid, task_id))
