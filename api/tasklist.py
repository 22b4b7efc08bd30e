"""A solution's task list: ``GET /solutions/{sid}/tasks``, newest first.

Every accepted message gets an entry in its solution's index (``keys.task_index``) in the
step that writes its first document: a sorted set scored by the creation time, member
``"<task_id> <recipient>,<recipient>…"`` (the recipients' comparison keys: bare addresses
hold neither spaces nor commas). Each write trims the entries older than the documents'
time to live and gives the set that time to live, so the index is never larger than the
documents it points to. The list reads the index newest first, filters by recipient on the
members, loads the documents (one MGET per slice) and filters by state; a page scans at most
:data:`SCAN_MAX` entries, so a rare state costs a short page (with a cursor), not an
unbounded read. The cursor is opaque to callers: the creation time of the last entry
examined (entries created in the same microsecond as a page's last one may be skipped).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import redis

from postroom.shared import keys
from postroom.shared.schemas.addresses import address_key

#: index entries a page examines at most (each slice one ZREVRANGEBYSCORE and one MGET)
SCAN_MAX = 2000
SLICE = 200


def entry(task_id: str, recipients: Iterable[str]) -> str:
    """The index member of a message."""
    return task_id + " " + ",".join(dict.fromkeys(address_key(r) for r in recipients))


def add_to(pipe: Any, sid: str, task_id: str, created_at: float, recipients: Iterable[str],
           ttl_s: int) -> None:  # fmt: skip
    """Queue on ``pipe`` the index entry of a new message (and the trim of expired ones)."""
    key = keys.task_index(sid)
    pipe.zadd(key, {entry(task_id, recipients): created_at})
    pipe.zremrangebyscore(key, "-inf", f"({created_at - ttl_s!r}")
    pipe.expire(key, ttl_s)


@dataclass(frozen=True)
class Page:
    tasks: list[dict[str, Any]]
    next_cursor: str | None


#: what a cursor looks like (any such string is one: the list goes on below it)
CURSOR_PATTERN = r"^[0-9]{1,12}(\.[0-9]{1,9})?$"
_CURSOR = re.compile(CURSOR_PATTERN)


def encode_cursor(score: float) -> str:
    return repr(score)  # the exact score: the next page starts strictly below it


def decode_cursor(cursor: str) -> float | None:
    """The score a cursor names, or None when it is not one."""
    return float(cursor) if _CURSOR.match(cursor) else None


def page(client: redis.Redis, sid: str, *, limit: int, state: str | None = None,
         recipient: str | None = None, before: float | None = None) -> Page:  # fmt: skip
    """Up to ``limit`` task documents of ``sid``, newest first, created before ``before``
    (a cursor's score), in ``state`` and to ``recipient`` when given."""
    key = keys.task_index(sid)
    wanted = address_key(recipient) if recipient else None
    tasks: list[dict[str, Any]] = []
    high: str = "+inf" if before is None else f"({before!r}"
    scanned = 0
    last: float | None = None
    while scanned < SCAN_MAX:
        rows: list[tuple[bytes, float]] = client.zrevrangebyscore(  # type: ignore[assignment]
            key, high, "-inf", start=0, num=SLICE, withscores=True
        )
        if not rows:
            return Page(tasks, None)
        ids: list[tuple[str, float]] = []
        for member, score in rows:
            task_id, _, rcpts = member.decode().partition(" ")
            if wanted is None or wanted in rcpts.split(","):
                ids.append((task_id, score))
        raws = client.mget([keys.task(sid, t) for t, _ in ids]) if ids else []
        for (_, score), raw in zip(ids, raws, strict=True):
            if raw is None:
                continue
            doc = json.loads(raw)
            if state is None or doc.get("state") == state:
                tasks.append(doc)
                if len(tasks) == limit:
                    return Page(tasks, encode_cursor(score))
        scanned += len(rows)
        last = rows[-1][1]
        high = f"({last!r}"
        if len(rows) < SLICE:
            return Page(tasks, None)
    return Page(tasks, None if last is None else encode_cursor(last))
