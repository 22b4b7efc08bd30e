"""One webhook POST: the address guard at connect time, a connect timeout and a total one,
no redirects followed, the answer's status (its body is read only up to a small bound).

Standard library only (``socket``, ``ssl``, ``http.client``): the worker connects to the
address the guard checked (never a second lookup that a rebinding DNS server could answer
differently) and speaks HTTP/1.1 over that socket, TLS with the URL's host name verified.
"""

from __future__ import annotations

import http.client
import socket
import ssl
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from shared.errors import InvalidRelay
from shared.webhooks import WebhookGuard, url_target

#: bytes of an answer's body read at most (the status is what counts)
MAX_BODY = 64 * 1024


@dataclass(frozen=True)
class Answer:
    """What became of one POST: the status (None when none came) and, when it was no
    2xx, why, in a few words."""

    status: int | None
    error: str | None

    @property
    def delivered(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


def post(url: str, body: bytes, headers: dict[str, str], *, guard: WebhookGuard,
         ssl_context: ssl.SSLContext, connect_timeout_s: float,
         timeout_s: float) -> Answer:  # fmt: skip
    """POST ``body`` to ``url``; a 2xx within ``timeout_s`` (connecting included) is
    delivered, and anything else says why not."""
    deadline = time.monotonic() + timeout_s
    parts = urlsplit(url)
    host, port = url_target(url)
    try:
        address = guard.check(host, port)
    except InvalidRelay as err:
        return Answer(None, f"refused: {err.message.replace('relay host', 'host')}")
    sock: socket.socket | None = None
    try:
        sock = socket.create_connection((address, port), timeout=min(connect_timeout_s,
                                                                     timeout_s))
        if parts.scheme.lower() == "https":
            sock.settimeout(_left(deadline))
            sock = ssl_context.wrap_socket(sock, server_hostname=host)
        conn = http.client.HTTPConnection(host, port)
        conn.sock = sock
        sock.settimeout(_left(deadline))
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        conn.request("POST", path, body=body, headers=headers)
        sock.settimeout(_left(deadline))
        response = conn.getresponse()
        sock.settimeout(_left(deadline))
        response.read(MAX_BODY)
        if time.monotonic() > deadline:
            return Answer(None, f"timeout: no whole answer within {timeout_s:g} s")
        status = response.status
        if 200 <= status < 300:
            return Answer(status, None)
        if 300 <= status < 400:
            return Answer(status, "redirect not followed")
        return Answer(status, f"HTTP {status}")
    except TimeoutError:
        return Answer(None, f"timeout: no whole answer within {timeout_s:g} s")
    except ssl.SSLError as err:
        return Answer(None, f"tls: {err.reason or type(err).__name__}")
    except (OSError, http.client.HTTPException) as err:
        return Answer(None, f"connection: {type(err).__name__}")
    finally:
        if sock is not None:
            sock.close()


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    return left
