"""The API's gunicorn worker: gunicorn's sync worker, closing a finished connection at once.

After each response gunicorn's sync worker closes the connection gracefully (RFC 9112
section 9.6): it half-closes, then waits, up to two seconds, for the client to close its
side, reading and dropping whatever the client still sends. That wait keeps a client from
getting a reset instead of its answer when the request was not read to its end (a body
refused as too large, say), and it costs every request a sleep and a wake-up of its
worker while the client reads the answer and closes.

This worker closes at once when nothing can come of waiting: the request's body was read
to its end (or it had none) and nothing more waits on the socket. Any other connection
(a body not read whole, a chunked body, bytes behind the request, TLS) is closed by
gunicorn's graceful path as before. What it gains against gunicorn's own sync worker is
in ``docs/throughput.md``.

``postroom api`` runs it by default (``--worker-class postroom.api.server.SyncWorker``).
"""

from __future__ import annotations

import socket
from typing import Any

from gunicorn.http.body import EOFReader, LengthReader
from gunicorn.workers.sync import SyncWorker as GunicornSyncWorker


def nothing_more(req: Any, client: Any) -> bool:
    """Whether ``client`` can be closed without a reset: its request ``req`` was read to
    the end and no byte waits unread on the socket."""
    if type(client) is not socket.socket:  # TLS: its own close handshake, gunicorn's path
        return False
    body = getattr(req, "body", None)
    if body is None or body.failed:
        return False
    reader = body.reader
    if isinstance(reader, LengthReader):
        if reader.length:  # the body was not read to its end
            return False
    elif not isinstance(reader, EOFReader):  # chunked: where it ends is the reader's
        return False
    # a request with neither Content-Length nor Transfer-Encoding has no body (RFC 9112
    # section 6.3), so with an EOFReader nothing more is owed either
    try:
        waiting = client.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return True  # nothing waits
    except OSError:
        return False
    return not waiting  # b"": the client has closed its side already


class SyncWorker(GunicornSyncWorker):
    """gunicorn's sync worker, which closes a connection at once when :func:`nothing_more`
    says waiting for the client could change nothing."""

    def handle_request(self, listener: Any, req: Any, client: Any, addr: Any) -> None:
        super().handle_request(listener, req, client, addr)
        if nothing_more(req, client):
            # gunicorn's graceful close that follows finds the socket closed and returns
            client.close()
