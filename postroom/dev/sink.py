"""A capture SMTP server for development: it accepts every message and keeps it as a file.

``postroom dev`` points the default relay at it (``smtp+plain://127.0.0.1:1025``). Each
message becomes ``<mail_dir>/20261124T000102Z-<n>.eml``, written atomically (a temporary
file linked into place), with the envelope prepended as ``Return-Path`` and
``X-Envelope-To`` headers (Bcc recipients appear nowhere else). The messages received so
far are also kept in memory, in :attr:`MailSink.messages`, for tests.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.parser import BytesHeaderParser
from email.policy import default as default_policy
from pathlib import Path

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

SINK_HOSTNAME = "postroom-sink.localhost"  # avoids socket.getfqdn() on each connection


@dataclass(frozen=True)
class CapturedMessage:
    received_at: float  # Unix time
    mail_from: str
    rcpt_tos: tuple[str, ...]
    subject: str
    path: Path

    def summary(self) -> str:
        """One line for a console: time, sender, recipients, subject, file."""
        stamp = time.strftime("%H:%M:%S", time.localtime(self.received_at))
        to = ", ".join(self.rcpt_tos)
        return f"{stamp}  {self.mail_from or '<>'} -> {to}  {self.subject!r}  {self.path}"


class FileSinkHandler:
    """aiosmtpd handler: writes each message to ``mail_dir`` and remembers it."""

    def __init__(
        self,
        mail_dir: Path,
        on_message: Callable[[CapturedMessage], None] | None = None,
    ) -> None:
        self.mail_dir = mail_dir
        self.on_message = on_message
        self.messages: list[CapturedMessage] = []
        self._lock = threading.Lock()
        self._seq = 0

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        mail_from = envelope.mail_from or ""
        rcpt_tos = tuple(envelope.rcpt_tos)
        received_at = time.time()
        head = (f"Return-Path: <{mail_from}>\r\nX-Envelope-To: {', '.join(rcpt_tos)}\r\n").encode(
            "utf-8", "surrogateescape"
        )
        path = self._write(head + content, received_at)
        parsed = BytesHeaderParser(policy=default_policy).parsebytes(content)
        captured = CapturedMessage(
            received_at=received_at,
            mail_from=mail_from,
            rcpt_tos=rcpt_tos,
            subject=str(parsed.get("subject", "")),
            path=path,
        )
        with self._lock:
            self.messages.append(captured)
        if self.on_message is not None:
            self.on_message(captured)
        return "250 Message accepted for delivery"

    def snapshot(self) -> list[CapturedMessage]:
        with self._lock:
            return list(self.messages)

    def _write(self, data: bytes, received_at: float) -> Path:
        """Write ``data`` under a new name; a reader never sees a partial file."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(received_at))
        fd, tmp = tempfile.mkstemp(prefix=".incoming-", dir=self.mail_dir)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            while True:
                with self._lock:
                    self._seq += 1
                    target = self.mail_dir / f"{stamp}-{self._seq}.eml"
                try:
                    os.link(tmp, target)  # fails instead of overwriting an older file
                    return target
                except FileExistsError:
                    continue
        finally:
            os.unlink(tmp)


class MailSink:
    """The capture server on ``host:port`` (plain SMTP, no auth: loopback only)."""

    def __init__(
        self,
        mail_dir: str | os.PathLike[str],
        host: str = "127.0.0.1",
        port: int = 1025,
        on_message: Callable[[CapturedMessage], None] | None = None,
    ) -> None:
        self.mail_dir = Path(mail_dir)
        self.host = host
        self.port = port
        self.handler = FileSinkHandler(self.mail_dir, on_message)
        self._controller: Controller | None = None

    @property
    def url(self) -> str:
        """The relay URL that sends to this sink."""
        return f"smtp+plain://{self.host}:{self.port}"

    @property
    def messages(self) -> list[CapturedMessage]:
        """The messages received so far (a copy)."""
        return self.handler.snapshot()

    def start(self) -> MailSink:
        self.mail_dir.mkdir(parents=True, exist_ok=True)
        controller = Controller(
            self.handler,
            hostname=self.host,
            port=self.port,
            server_hostname=SINK_HOSTNAME,
        )
        controller.start()
        self._controller = controller
        return self

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def __enter__(self) -> MailSink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
