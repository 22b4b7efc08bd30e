"""Celery's task message for ``postroom.send_email``: encoded and decoded side by side.

The intake publishes every job as Celery task ``postroom.send_email`` (task protocol 2,
JSON, the job as the keyword argument ``job``); the workers decode it. On a Redis broker a
published message is one JSON document pushed on the queue's list, so the intake frames it
itself (:meth:`TaskFraming.frame`) and pushes it in the same transaction as its other
writes (the task document, the accepted-set entry); on RabbitMQ the same message is an AMQP
message (:meth:`TaskFraming.amqp_message`), published by
:mod:`postroom.shared.celery_wire.amqp_publisher`. Other brokers, and delayed publishing, go through
``Celery.send_task``.

Decoding: :func:`decode_message` (a kombu message delivered to the worker's strategy),
:func:`decode_body` (a protocol-2 body) and :func:`job_of` (a message as kombu's Redis
transport stores it in the queue's list or its unacked hash).

``tests/test_task_message.py`` holds the encoding to what ``send_task`` of the installed
Celery writes, field by field, and runs both directions against Celery itself: a message
framed here is one Celery's own worker runs, and one ``send_task`` writes is one decoded
here (``tests/test_amqp_publisher.py`` does the same for RabbitMQ).
"""

from __future__ import annotations

import base64
import json
import os
import socket
import uuid
from collections.abc import Mapping
from typing import Any, cast

import amqp

from postroom.shared.records import Job

#: the Celery task every job is sent as, the name the API and the workers agree on
SEND_TASK = "postroom.send_email"

_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}

_EMBED_JSON = json.dumps(_EMBED, separators=(",", ":"))
#: the parts of a message that differ from one message to the next
_SLOTS = ("body", "task_id", "kwargsrepr", "origin", "tag")


def redacted(job: Mapping[str, Any]) -> str:
    """What Celery may print of a job: ids only, never addresses, bodies or passwords."""
    return repr({"task_id": job.get("task_id"), "solution_id": job.get("solution_id")})


class TaskFraming:
    """Frames ``postroom.send_email`` messages for one queue (priority 0: the list named
    after the queue). What is the same for every message is serialized once, into a
    template the per-message parts are written into (:data:`_SLOTS`, each JSON-escaped)."""

    def __init__(self, queue: str, task_name: str = SEND_TASK) -> None:
        self.queue = queue
        self.task_name = task_name
        self._host = socket.gethostname()
        self._reply_to = str(uuid.uuid4())
        marks = {name: f"\x00{name}\x00" for name in _SLOTS}
        template = json.dumps(self._message(**marks)).replace("%", "%%")
        for name, mark in marks.items():
            template = template.replace(json.dumps(mark), f"%({name})s")
        self._template = template

    def frame(self, job: Mapping[str, Any], job_json: str | None = None) -> str:
        """The message for ``job``; ``job_json``, the job as JSON when the caller has it
        already (any spelling: the worker decodes it)."""
        task_id = job["task_id"]
        if job_json is None:
            job_json = json.dumps(job)
        body = f'[[],{{"job":{job_json}}},{_EMBED_JSON}]'.encode()
        return self._template % {
            "body": f'"{base64.b64encode(body).decode()}"',
            "task_id": json.dumps(task_id),
            "kwargsrepr": json.dumps(redacted(job)),
            "origin": json.dumps(f"gen{os.getpid()}@{self._host}"),
            "tag": json.dumps(str(uuid.uuid4())),
        }

    def amqp_message(self, job: Mapping[str, Any], job_json: str | None = None) -> amqp.Message:
        """The AMQP message ``send_task`` publishes to RabbitMQ for ``job`` (protocol 2,
        JSON): the same body and headers as :meth:`frame`, as AMQP carries them."""
        task_id = job["task_id"]
        if job_json is None:
            job_json = json.dumps(job)
        origin = f"gen{os.getpid()}@{self._host}"
        headers = self._message("", task_id, redacted(job), origin, "")["headers"]
        return amqp.Message(
            f'[[],{{"job":{job_json}}},{_EMBED_JSON}]'.encode(),
            content_type="application/json",
            content_encoding="utf-8",
            application_headers=headers,
            delivery_mode=2,
            priority=0,
            correlation_id=task_id,
            reply_to=self._reply_to,
        )

    def _message(
        self, body: str, task_id: str, kwargsrepr: str, origin: str, tag: str
    ) -> dict[str, Any]:
        return {
            "body": body,
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
                "origin": origin,
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
                "delivery_tag": tag,
            },
        }


def decode_body(body: Any) -> Job:
    """The job of a protocol-2 Celery message body ``[args, kwargs, embed]`` (bytes, text
    or decoded): the keyword argument ``job`` (as the intake frames it), or the first
    positional one. Raises ValueError, TypeError, KeyError or IndexError when there is
    none."""
    if isinstance(body, (bytes, bytearray, memoryview)):
        body = bytes(body).decode("utf-8")
    if isinstance(body, str):
        body = json.loads(body)
    args, kwargs = body[0], body[1]
    job = kwargs["job"] if "job" in kwargs else args[0]
    if not isinstance(job, dict) or "task_id" not in job or "solution_id" not in job:
        raise ValueError("not a postroom job")
    return cast(Job, job)


def decode_message(message: Any) -> Job:
    """The job of a kombu message delivered to the task's strategy; raises as
    :func:`decode_body` does, and ValueError for a content type other than JSON (Celery
    messages are never read as pickle here)."""
    content_type = getattr(message, "content_type", None) or "application/json"
    if content_type != "application/json":
        raise ValueError(f"content type {content_type} is not accepted")
    return decode_body(message.body)


def job_of(raw: bytes | str) -> Job | None:
    """The job of a ``postroom.send_email`` message as kombu's Redis transport stores it
    (the document :meth:`TaskFraming.frame` writes), else None."""
    try:
        message = json.loads(raw)
        if message.get("headers", {}).get("task") != SEND_TASK:
            return None
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        return decode_body(body)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        return None
