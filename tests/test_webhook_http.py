"""The reader of webhook answers (``worker/webhook_http.py``, ``read_answer``): the status,
and whether the connection may carry the next POST, for the shapes HTTP/1.x answers take.
Over a socket pair (no network): the bytes are written as a receiver would."""

from __future__ import annotations

import http.client
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from postroom.worker.webhook_http import MAX_BODY, read_answer


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, theirs = socket.socketpair()
    yield ours, theirs
    ours.close()
    theirs.close()


def answer(pair: tuple[socket.socket, socket.socket], *pieces: bytes,
           close: bool = False) -> tuple[int, bool]:  # fmt: skip
    """What ``read_answer`` makes of ``pieces`` written one after the other (each its own
    write, so that a reader that needs more than one read is exercised); ``close``: the
    writer closes after them."""
    ours, theirs = pair

    def write() -> None:
        for piece in pieces:
            theirs.sendall(piece)
            time.sleep(0.002)
        if close:
            theirs.shutdown(socket.SHUT_WR)

    writer = threading.Thread(target=write)
    writer.start()
    try:
        return read_answer(ours, time.monotonic() + 5)
    finally:
        writer.join()


def leftover(pair: tuple[socket.socket, socket.socket]) -> bytes:
    ours, _ = pair
    ours.setblocking(False)
    try:
        return ours.recv(100)
    except BlockingIOError:
        return b""


@pytest.mark.parametrize("pieces, expected", [
    ((b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n",), (204, True)),
    ((b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel", b"lo"), (200, True)),
    ((b"HTTP/1.1 200 OK\r\n", b"content-length: 2\r\n", b"\r\n", b"ok"), (200, True)),
    ((b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
      b"3;x=y\r\nabc\r\n", b"2\r\nde\r\n0\r\n", b"Trailer: 1\r\n\r\n"), (200, True)),
    ((b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n"),
     (202, True)),
    ((b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",), (200, False)),
    ((b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n",), (200, False)),
    ((b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 4\r\n\r\noops",), (500, True)),
    ((b"HTTP/1.1 302 Found\r\nLocation: http://10.0.0.1/\r\nContent-Length: 0\r\n\r\n",),
     (302, True)),
    ((b"HTTP/1.1 204 No Content\r\n\r\n",), (204, True)),
])  # fmt: skip
def test_status_and_whether_the_connection_is_kept(
    pair: tuple[socket.socket, socket.socket], pieces: tuple[bytes, ...],
    expected: tuple[int, bool],
) -> None:
    assert expected == answer(pair, *pieces)
    assert b"" == leftover(pair)  # the whole answer was read, not a byte of the next


def test_bytes_beyond_the_answer_leave_the_connection_unkept(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """More than the answer arrived (nothing asked for it): the connection is out of step
    and is not used for the next POST."""
    both = (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\none"
            b"HTTP/1.1 503 Busy\r\nContent-Length: 3\r\n\r\ntwo")  # fmt: skip
    assert (200, False) == answer(pair, both)


def test_a_body_that_ends_with_the_connection_is_read_and_not_kept(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    assert (200, False) == answer(pair, b"HTTP/1.1 200 OK\r\n\r\nall of it", close=True)


def test_a_body_beyond_the_bound_is_not_read_whole_and_not_kept(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    big = MAX_BODY + 10
    head = f"HTTP/1.1 200 OK\r\nContent-Length: {big}\r\n\r\n".encode()
    assert (200, False) == answer(pair, head, b"x" * 1000)


def test_a_chunked_body_beyond_the_bound_is_not_kept(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunk = f"{MAX_BODY + 1:x}\r\n".encode()
    assert (200, False) == answer(pair, head, chunk)


@pytest.mark.parametrize("pieces, error", [
    ((b"SSH-2.0-OpenSSH_9.6\r\n\r\n",), http.client.BadStatusLine),
    ((b"HTTP/1.1 2000 OK\r\n\r\n",), http.client.BadStatusLine),
    ((b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",), http.client.HTTPException),
    ((b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",),
     http.client.HTTPException),
    ((b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",),
     http.client.HTTPException),
    ((b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",), http.client.IncompleteRead),
    ((b"HTTP/1.1 200",), http.client.RemoteDisconnected),
])  # fmt: skip
def test_what_is_not_an_answer_raises(
    pair: tuple[socket.socket, socket.socket], pieces: tuple[bytes, ...],
    error: type[Exception],
) -> None:
    with pytest.raises(error):
        answer(pair, *pieces, close=True)


def test_an_answer_that_does_not_come_in_time_raises_timeout(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    pair[1].sendall(b"HTTP/1.1 200 OK\r\n")
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        read_answer(pair[0], time.monotonic() + 0.2)
    assert time.monotonic() - started < 2
