"""Celery task messages, framed here the way kombu's Redis transport stores them.

The intake API publishes every job as Celery task ``postroom.send_email`` (task protocol 2,
JSON). Through ``Celery.send_task`` that costs about as much CPU as the rest of the request
together (message building, kombu's publish machinery) and a round trip of its own. On a
Redis broker a published message is nothing more than one JSON document pushed on the
queue's list, so the API frames it itself and pushes it in the same transaction as its other
writes (the task document, the accepted-set entry). ``tests/test_framing.py`` holds the
framing to what ``send_task`` of the installed Celery writes, field by field; the workers
consume both alike. Other brokers, and delayed publishing, go through ``send_task``.

On RabbitMQ the same task message is an AMQP message: the body, the headers as the
message's application headers, and the few properties AMQP carries
(:meth:`TaskFraming.amqp_message`, held to what ``send_task`` publishes by
``tests/test_amqp_publisher.py``); :mod:`postroom.shared.amqp_publisher` publishes it.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import uuid
from collections.abc import Mapping
from typing import Any

import amqp

from postroom.shared.task_names import SEND_TASK

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
