"""The API's gunicorn worker (api/server.py): a finished connection is closed at once, any
other one by gunicorn's graceful path. Real sockets, gunicorn's own request parser, and
``postroom api`` itself."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from gunicorn import http
from gunicorn.config import Config

from postroom.api.server import nothing_more
from postroom.shared.settings import Settings
from tests.stack import ApiProcess

BODY = b'{"to": ["a@example.com"]}'

pytestmark = pytest.mark.settings(default_smtp_url="smtp+plain://127.0.0.1:25")


def post(length: int, body: bytes = BODY, extra: str = "") -> bytes:
    head = (
        f"POST /api/v1/solutions/acme/email HTTP/1.1\r\nHost: t\r\n"
        f"Content-Type: application/json\r\nContent-Length: {length}\r\n{extra}\r\n"
    )
    return head.encode() + body


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected loopback TCP pair: (the client's end, the server's end)."""
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    listener.close()
    yield client, server
    client.close()
    server.close()


def parsed(server: socket.socket):  # type: ignore[no-untyped-def]
    """The first request on ``server``, as gunicorn's sync worker parses it."""
    return next(http.get_parser(Config(), server, ("127.0.0.1", 1)))


def settle() -> None:
    time.sleep(0.05)  # loopback delivery of what the client just sent


def test_a_request_read_to_its_end_may_be_closed_at_once(pair) -> None:  # type: ignore[no-untyped-def]
    client, server = pair
    client.sendall(post(len(BODY)))
    req = parsed(server)
    assert BODY == req.body.read()
    assert nothing_more(req, server)


def test_a_request_without_a_body_may_be_closed_at_once(pair) -> None:  # type: ignore[no-untyped-def]
    client, server = pair
    client.sendall(b"GET /api/v1/solution/health HTTP/1.1\r\nHost: t\r\n\r\n")
    assert nothing_more(parsed(server), server)


def test_a_body_not_read_to_its_end_is_closed_gracefully(pair) -> None:  # type: ignore[no-untyped-def]
    """A body refused unread (413, say): waiting lets the client read its answer."""
    client, server = pair
    client.sendall(post(len(BODY)))
    req = parsed(server)
    assert not nothing_more(req, server)


def test_bytes_still_coming_are_closed_gracefully(pair) -> None:  # type: ignore[no-untyped-def]
    """Bytes behind the request on the socket (pipelined, or sent late) would turn a close
    into a reset."""
    client, server = pair
    client.sendall(post(len(BODY)))
    req = parsed(server)
    req.body.read()
    client.sendall(post(len(BODY)))
    settle()
    assert not nothing_more(req, server)


def test_a_chunked_body_is_closed_gracefully(pair) -> None:  # type: ignore[no-untyped-def]
    client, server = pair
    head = post(0, b"").replace(b"Content-Length: 0", b"Transfer-Encoding: chunked")
    client.sendall(head + b"%x\r\n%s\r\n0\r\n\r\n" % (len(BODY), BODY))
    req = parsed(server)
    req.body.read()
    assert not nothing_more(req, server)


def test_a_client_that_closed_already_may_be_closed_at_once(pair) -> None:  # type: ignore[no-untyped-def]
    client, server = pair
    client.sendall(post(len(BODY)))
    client.shutdown(socket.SHUT_WR)
    req = parsed(server)
    req.body.read()
    settle()
    assert nothing_more(req, server)


def test_a_socket_that_is_not_plain_tcp_takes_the_graceful_path(pair) -> None:  # type: ignore[no-untyped-def]
    """TLS sockets close with their own handshake: gunicorn's path, always."""
    client, server = pair
    client.sendall(post(len(BODY)))
    req = parsed(server)
    req.body.read()

    class Wrapped(socket.socket):
        pass

    wrapped = Wrapped(fileno=server.detach())
    try:
        assert not nothing_more(req, wrapped)
    finally:
        wrapped.close()


# -- postroom api itself ----------------------------------------------------------------


def exchange(port: int, request: bytes, close: bool) -> tuple[bytes, float, socket.socket]:
    """Send ``request``, read the whole answer (to the server's close); the answer, the
    seconds it took, and the socket (closed if ``close``)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    started = time.perf_counter()
    sock.sendall(request)
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    took = time.perf_counter() - started
    if close:
        sock.close()
    return b"".join(chunks), took, sock


HEALTH = b"GET /api/v1/solution/health HTTP/1.1\r\nHost: t\r\n\r\n"


@pytest.mark.parametrize("worker_class, waits", [("postroom.api.server.SyncWorker", False),
                                                 ("sync", True)])
def test_a_client_that_keeps_its_socket_open_holds_no_worker(
    settings: Settings, real_redis: redis.Redis, tmp_path: Path, worker_class: str, waits: bool
) -> None:
    """One API process. A client reads its answer and keeps its socket open: gunicorn's
    stock sync worker then waits for it (up to two seconds) before it serves anyone else;
    postroom's worker has closed the connection and answers the next client at once."""
    api = ApiProcess(settings, workers=1, log_path=tmp_path / "api.log",
                     extra=["--worker-class", worker_class]).start()
    try:
        port = api.port
        answer, _, held = exchange(port, HEALTH, close=False)
        assert answer.startswith(b"HTTP/1.1 200")
        try:
            answer, took, _ = exchange(port, HEALTH, close=True)
        finally:
            held.close()
        assert answer.startswith(b"HTTP/1.1 200")
        assert (took > 1.0) is waits, took
    finally:
        api.stop()


def test_a_body_refused_unread_still_reaches_the_client_whole(
    settings: Settings, real_redis: redis.Redis, tmp_path: Path
) -> None:
    """A body over the size limit is refused (413) before it is read; the client, still
    sending, gets the whole 413 and not a reset."""
    api = ApiProcess(settings, workers=1, log_path=tmp_path / "api.log").start()
    try:
        size = settings.max_body_bytes + 1
        sock = socket.create_connection(("127.0.0.1", api.port), timeout=10)
        sock.sendall(post(size, b'{"to": "' + b"x" * 65536))
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        sock.close()
        answer = b"".join(chunks)
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        assert b'"error"' in answer and answer.rstrip().endswith(b"}")
    finally:
        api.stop()


def test_postroom_api_runs_this_worker_by_default() -> None:
    """The CLI names the class by import string (it imports nothing of api/)."""
    from gunicorn.util import load_class
    from gunicorn.workers.sync import SyncWorker as GunicornSyncWorker

    from postroom.api.server import SyncWorker
    from postroom.cli import build_parser

    args, _ = build_parser().parse_known_args(["api"])
    assert load_class(args.worker_class) is SyncWorker
    assert issubclass(SyncWorker, GunicornSyncWorker)
