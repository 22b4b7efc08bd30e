"""Celery task messages, framed here the way kombu's Redis transport stores them.

The intake API publishes every job as Celery task ``postroom.send_email`` (task protocol 2,
JSON). Through ``Celery.send_task`` that costs about as much CPU as the rest of the request
together (message building, kombu's publish machinery) and a round trip of its own. On a
Redis broker a published message is nothing more than one JSON document pushed on the
queue's list, so the API frames it itself and pushes it in the same transaction as its other
writes (the task document, the accepted-set entry). ``tests/test_framing.py`` holds the
framing to what ``send_task`` of the installed Celery writes, field by field; the workers
consume both alike. Other brokers, and delayed publishing, go through ``send_task``.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import uuid
from typing import Any

from shared.names import SEND_TASK

_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


def redacted(job: dict[str, Any]) -> str:
    """What Celery may print of a job: ids only, never addresses, bodies or passwords."""
    return repr({"task_id": job.get("task_id"), "solution_id": job.get("solution_id")})


class TaskFraming:
    """Frames ``postroom.send_email`` messages for one queue (priority 0: the list named
    after the queue)."""

    def __init__(self, queue: str, task_name: str = SEND_TASK) -> None:
        self.queue = queue
        self.task_name = task_name
        self._host = socket.gethostname()
        self._reply_to = str(uuid.uuid4())

    def frame(self, job: dict[str, Any]) -> str:
        task_id = job["task_id"]
        kwargsrepr = redacted(job)
        body = json.dumps([[], {"job": job}, _EMBED]).encode()
        message = {
            "body": base64.b64encode(body).decode(),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": {
                "lang": "py",
                "task": self.task_name,
                "id": task_id,
                "shadow": None,
                "eta": None,
                "expires": None,
                "group": None,
                "group_index": None,
                "retries": 0,
                "timelimit": [None, None],
                "root_id": task_id,
                "parent_id": None,
                "argsrepr": "()",
                "kwargsrepr": kwargsrepr,
                "origin": f"gen{os.getpid()}@{self._host}",
                "ignore_result": None,
                "replaced_task_nesting": 0,
                "stamped_headers": None,
                "stamps": {},
            },
            "properties": {
                "correlation_id": task_id,
                "reply_to": self._reply_to,
                "argsrepr": "()",
                "kwargsrepr": kwargsrepr,
                "delivery_mode": 2,
                "delivery_info": {"exchange": "", "routing_key": self.queue},
                "priority": 0,
                "body_encoding": "base64",
                "delivery_tag": str(uuid.uuid4()),
            },
        }
        return json.dumps(message)
