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
#: bytes of an answer's status line and header fields read at most
MAX_HEAD = 64 * 1024
#: bytes asked of the socket at a time
RECV_SIZE = 16 * 1024
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
    body apart: a second system call per event); the answer is read by
    :func:`read_answer` (``http.client``'s reader, with its buffered file and ``email``
    header parser, costs as much CPU as the rest of the POST: ``docs/throughput.md``)."""
    sock = conn.sock
    assert sock is not None
    lines = [f"POST {path} HTTP/1.1", f"Host: {_host_header(conn)}",
             f"Content-Length: {len(body)}",
             *(f"{name}: {value}" for name, value in headers.items())]  # fmt: skip
    sock.settimeout(_left(deadline))
    sock.sendall("\r\n".join(lines).encode("latin-1") + b"\r\n\r\n" + body)
    status, reusable = read_answer(sock, deadline)
    if time.monotonic() > deadline:
        return Answer(None, f"timeout: no whole answer within {timeout_s:g} s"), False
    if 200 <= status < 300:
        return Answer(status, None), reusable
    if 300 <= status < 400:
        return Answer(status, "redirect not followed"), reusable
    return Answer(status, f"HTTP {status}"), reusable


def read_answer(sock: socket.socket, deadline: float) -> tuple[int, bool]:
    """Read one HTTP/1.x answer to a POST from ``sock``: its status, and whether the
    connection may carry the next request (HTTP/1.1 without ``Connection: close``, the
    body read whole within :data:`MAX_BODY`; an HTTP/1.0 one is never kept). Interim
    1xx answers are skipped; a body is delimited by ``Content-Length``, chunked, or the
    end of the connection. Raises
    :class:`TimeoutError` past ``deadline``, ``http.client.HTTPException`` (a subclass)
    on what is not HTTP, ``ConnectionError`` when the peer closes early."""
    reader = _Reader(sock, deadline)
    while True:
        head = reader.head()
        status_line, *fields = head.split(b"\r\n")
        version, _, rest = status_line.partition(b" ")
        code = rest[:3]
        if not (version.startswith(b"HTTP/1.") and len(code) == 3 and code.isdigit()
                and rest[3:4] in (b"", b" ")):
            raise http.client.BadStatusLine(status_line[:80].decode("latin-1"))
        status = int(code)
        if status >= 200 or status == 101:
            break
    length: int | None = None
    chunked = False
    close = version == b"HTTP/1.0"
    for line in fields:
        name, colon, value = line.partition(b":")
        if not colon:
            continue
        name, value = name.strip().lower(), value.strip().lower()
        if name == b"content-length":
            if not value.isdigit() or (length is not None and int(value) != length):
                raise http.client.HTTPException("bad Content-Length")
            length = int(value)
        elif name == b"transfer-encoding":
            chunked = value.endswith(b"chunked")
        elif name == b"connection":
            close = close or b"close" in {t.strip() for t in value.split(b",")}
    try:
        if status in (101, 204, 304):
            whole = status != 101
        elif chunked:
            whole = reader.chunks()
        elif length is not None:
            whole = reader.exactly(length)
        else:
            reader.until_closed()
            whole = False
    except _TooLong:
        whole = False
    # bytes beyond the answer (nothing was asked for them): the connection is out of step
    return status, whole and not close and not reader.rest()


class _Reader:
    """Bytes of one answer from a socket, read in large pieces, at most
    :data:`MAX_BODY` (and the head) of them."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self._sock = sock
        self._deadline = deadline
        self._buf = b""
        self._read = 0

    def _more(self) -> bytes:
        if self._read > MAX_BODY + MAX_HEAD:
            raise _TooLong("answer")
        self._sock.settimeout(_left(self._deadline))
        data = self._sock.recv(RECV_SIZE)
        self._read += len(data)
        return data

    def rest(self) -> bytes:
        """What was read beyond the answer."""
        return self._buf

    def head(self) -> bytes:
        """The status line and header fields, up to the blank line (consumed)."""
        start = 0
        while True:
            end = self._buf.find(b"\r\n\r\n", start)
            if end >= 0:
                head, self._buf = self._buf[:end], self._buf[end + 4:]
                return head
            if len(self._buf) > MAX_HEAD:
                raise http.client.LineTooLong("header")
            start = max(0, len(self._buf) - 3)
            data = self._more()
            if not data:
                raise http.client.RemoteDisconnected("closed before an answer")
            self._buf += data

    def exactly(self, n: int) -> bool:
        """Skip ``n`` bytes of body; False when more than :data:`MAX_BODY`."""
        if n > MAX_BODY:
            return False
        while len(self._buf) < n:
            data = self._more()
            if not data:
                raise http.client.IncompleteRead(self._buf)
            self._buf += data
        self._buf = self._buf[n:]
        return True

    def line(self) -> bytes:
        while True:
            end = self._buf.find(b"\r\n")
            if end >= 0:
                line, self._buf = self._buf[:end], self._buf[end + 2:]
                return line
            if len(self._buf) > MAX_HEAD:
                raise http.client.LineTooLong("chunk size")
            data = self._more()
            if not data:
                raise http.client.IncompleteRead(self._buf)
            self._buf += data

    def chunks(self) -> bool:
        """Skip a chunked body and its trailer; False when more than :data:`MAX_BODY`."""
        total = 0
        while True:
            size_text = self.line().partition(b";")[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise http.client.HTTPException("bad chunk size") from None
            if size == 0:
                while self.line():  # the trailer, up to its blank line
                    pass
                return True
            total += size
            if total > MAX_BODY or not self.exactly(size):
                return False
            if self.line():
                raise http.client.HTTPException("no CRLF after a chunk")

    def until_closed(self) -> None:
        """Skip a body that ends with the connection, at most :data:`MAX_BODY` of it."""
        try:
            while self._more():
                pass
        except _TooLong:
            pass
        self._buf = b""


class _TooLong(http.client.HTTPException):
    """More bytes than an answer may have."""


def _host_header(conn: http.client.HTTPConnection) -> str:
    host = f"[{conn.host}]" if ":" in conn.host else conn.host
    return host if conn.port in (80, 443) else f"{host}:{conn.port}"


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    return left
