"""One webhook POST: the address guard at connect time, a connect timeout and a total one,
no redirects followed, the answer's status (its body is read only up to a small bound).

Standard library only (``socket``, ``ssl``, ``http.client``): the worker connects to the
address the guard checked (never a second lookup that a rebinding DNS server could answer
differently) and speaks HTTP/1.1 over that socket, TLS with the URL's host name verified.
Connections are kept for the next POST to the same endpoint (:class:`KeptConnections`):
a new connection per event cost the worker and the receiver a TCP handshake (and, with
TLS, a handshake more) each; a kept one that the receiver closed meanwhile is replaced
once, at once.
"""

from __future__ import annotations

import http.client
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from postroom.shared.errors import InvalidRelay
from postroom.shared.webhooks import WebhookGuard, url_target

#: bytes of an answer's body read at most (the status is what counts)
MAX_BODY = 64 * 1024
#: idle connections kept per endpoint address, and how long
KEEP_PER_TARGET = 8
KEEP_IDLE_S = 30.0

Target = tuple[str, str, int]  # scheme, host, port


@dataclass(frozen=True)
class Answer:
    """What became of one POST: the status (None when none came) and, when it was no
    2xx, why, in a few words."""

    status: int | None
    error: str | None

    @property
    def delivered(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


class KeptConnections:
    """Idle HTTP connections by endpoint address, shared by the delivering threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: dict[Target, list[tuple[float, http.client.HTTPConnection]]] = {}

    def take(self, target: Target) -> http.client.HTTPConnection | None:
        now = time.monotonic()
        with self._lock:
            idle = self._idle.get(target, [])
            while idle:
                since, conn = idle.pop()
                if now - since < KEEP_IDLE_S:
                    return conn
                conn.close()
        return None

    def give(self, target: Target, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            idle = self._idle.setdefault(target, [])
            if len(idle) < KEEP_PER_TARGET:
                idle.append((time.monotonic(), conn))
                return
        conn.close()

    def close_all(self) -> None:
        with self._lock:
            for idle in self._idle.values():
                for _, conn in idle:
                    conn.close()
            self._idle.clear()


class _Refused(Exception):
    pass


def post(url: str, body: bytes, headers: dict[str, str], *, guard: WebhookGuard,
         ssl_context: ssl.SSLContext, connect_timeout_s: float, timeout_s: float,
         kept: KeptConnections | None = None) -> Answer:  # fmt: skip
    """POST ``body`` to ``url``; a 2xx within ``timeout_s`` (connecting included) is
    delivered, and anything else says why not."""
    deadline = time.monotonic() + timeout_s
    parts = urlsplit(url)
    host, port = url_target(url)
    target: Target = (parts.scheme.lower(), host, port)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    conn = kept.take(target) if kept is not None else None
    try:
        answer: Answer | None = None
        if conn is not None:
            try:
                answer, reusable = _exchange(conn, path, body, headers, deadline, timeout_s)
            except (OSError, http.client.HTTPException):
                conn.close()  # closed by the receiver while kept: once more, afresh
        if answer is None:
            conn = _connect(target, guard, ssl_context, connect_timeout_s, deadline)
            answer, reusable = _exchange(conn, path, body, headers, deadline, timeout_s)
        if reusable and kept is not None and conn is not None:
            kept.give(target, conn)
            conn = None
        return answer
    except _Refused as err:
        return Answer(None, f"refused: {err}")
    except TimeoutError:
        return Answer(None, f"timeout: no whole answer within {timeout_s:g} s")
    except ssl.SSLError as err:
        return Answer(None, f"tls: {err.reason or type(err).__name__}")
    except (OSError, http.client.HTTPException) as err:
        return Answer(None, f"connection: {type(err).__name__}")
    finally:
        if conn is not None:
            conn.close()


def _connect(target: Target, guard: WebhookGuard, ssl_context: ssl.SSLContext,
             connect_timeout_s: float, deadline: float) -> http.client.HTTPConnection:
    scheme, host, port = target
    try:
        address = guard.check(host, port)
    except InvalidRelay as err:
        raise _Refused(err.message.replace("relay host", "host")) from None
    sock = socket.create_connection((address, port), timeout=min(connect_timeout_s,
                                                                 _left(deadline)))
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if scheme == "https":
            sock.settimeout(_left(deadline))
            sock = ssl_context.wrap_socket(sock, server_hostname=host)
    except BaseException:
        sock.close()
        raise
    conn = http.client.HTTPConnection(host, port)
    conn.sock = sock
    return conn


def _exchange(conn: http.client.HTTPConnection, path: str, body: bytes,
              headers: dict[str, str], deadline: float,
              timeout_s: float) -> tuple[Answer, bool]:  # fmt: skip
    """One request and its answer on ``conn``; and whether the connection may be kept.

    The request line, headers and body go out in one write (``http.client`` writes the
    body apart: a second system call per event); the answer is
    read by ``http.client``'s own parser."""
    sock = conn.sock
    assert sock is not None
    lines = [f"POST {path} HTTP/1.1", f"Host: {_host_header(conn)}",
             f"Content-Length: {len(body)}",
             *(f"{name}: {value}" for name, value in headers.items())]  # fmt: skip
    sock.settimeout(_left(deadline))
    sock.sendall("\r\n".join(lines).encode("latin-1") + b"\r\n\r\n" + body)
    response = http.client.HTTPResponse(sock, method="POST")
    try:
        sock.settimeout(_left(deadline))
        response.begin()
        sock.settimeout(_left(deadline))
        rest = response.read(MAX_BODY)
    finally:
        response.close()
    if time.monotonic() > deadline:
        return Answer(None, f"timeout: no whole answer within {timeout_s:g} s"), False
    reusable = response.isclosed() and not response.will_close and len(rest) < MAX_BODY
    status = response.status
    if 200 <= status < 300:
        return Answer(status, None), reusable
    if 300 <= status < 400:
        return Answer(status, "redirect not followed"), reusable
    return Answer(status, f"HTTP {status}"), reusable


def _host_header(conn: http.client.HTTPConnection) -> str:
    host = f"[{conn.host}]" if ":" in conn.host else conn.host
    return host if conn.port in (80, 443) else f"{host}:{conn.port}"


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    return left
