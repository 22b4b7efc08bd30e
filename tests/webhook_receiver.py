"""A real HTTP receiver for webhook tests: ``http.server`` on 127.0.0.1, a free port.

It keeps every request (headers and body bytes as received) and answers as told: a queue
of statuses (then ``default_status``), or ``hang`` (hold the request without answering
until released or stopped). Nothing happens at import time."""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class Hit:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Receiver:
    statuses: deque[int] = field(default_factory=deque)
    default_status: int = 204
    hang: bool = False
    hits: list[Hit] = field(default_factory=list)
    released: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                hit = Hit(self.path, {k.lower(): v for k, v in self.headers.items()}, body,
                          time.time())
                with receiver.lock:
                    receiver.hits.append(hit)
                    status = (receiver.statuses.popleft() if receiver.statuses
                              else receiver.default_status)
                if receiver.hang:
                    receiver.released.wait(60)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.released.set()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    def of_type(self, kind: str) -> list[Hit]:
        with self.lock:
            return [h for h in self.hits if h.json()["type"] == kind]
