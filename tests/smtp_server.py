"""A scriptable SMTP server for tests: aiosmtpd's ``Controller`` on 127.0.0.1, a free port.

It keeps every message it accepts and can be told how to answer: replies to MAIL and RCPT
(per address), a queue of replies to DATA, dropping the connection during DATA, AUTH with
one user, STARTTLS or implicit TLS with a certificate made at test time. ``SilentServer``
accepts TCP connections and never says a word. Nothing happens at import time.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from email.parser import BytesHeaderParser
from pathlib import Path
from typing import Any, Literal

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from postroom.dev.embedded_redis import free_port

LOOPBACK = "127.0.0.1"
DropMode = Literal["partial", "before_reply"]
RcptReplies = Mapping[str, str] | Callable[[str], str | None]


@dataclass(frozen=True)
class Received:
    """One message as the server got it."""

    mail_from: str
    rcpt_tos: list[str]
    data: bytes  # as received, CRLF line endings, dot-stuffing undone
    message_id: str | None
    received_at: float
    login: str | None  # the AUTH user of the session, if any
    mail_at: float = 0.0  # time.time() when its MAIL FROM arrived


@dataclass
class Script:
    """How the server answers; change it at any time, it is read on every command.

    ``mail_replies`` and ``data_replies`` are consumed one per command (then 250);
    ``sender_replies`` maps a sender address to its reply to MAIL FROM (when
    ``mail_replies`` is empty);
    ``rcpt_replies`` maps an address (or a function of it) to a reply (``None``: 250);
    ``drop_data``: ``"partial"`` closes after the first line of the message,
    ``"before_reply"`` after the whole message, instead of answering.
    ``rcpt_delay_s``: every RCPT TO is answered that much later (a slow server);
    ``rcpt_gate``: while this event is clear, every RCPT TO waits for it to be set (the
    server counts the sessions waiting in ``held``);
    ``data_without_recipients``: DATA with no recipient accepted answers 354 (as some
    relays that offer PIPELINING do, RFC 2920), then 554 to the message that follows.
    """

    mail_replies: deque[str] = field(default_factory=deque)
    sender_replies: Mapping[str, str] = field(default_factory=dict)
    rcpt_replies: RcptReplies = field(default_factory=dict)
    data_replies: deque[str] = field(default_factory=deque)
    drop_data: DropMode | None = None
    rcpt_delay_s: float = 0.0
    rcpt_gate: threading.Event | None = None
    data_without_recipients: bool = False

    def rcpt_reply(self, address: str) -> str | None:
        if callable(self.rcpt_replies):
            return self.rcpt_replies(address)
        return self.rcpt_replies.get(address)


class _Handler:
    def __init__(self, server: ScriptedSmtpServer) -> None:
        self._server = server

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        script = self._server.script
        if script.mail_replies:
            return script.mail_replies.popleft()
        if address in script.sender_replies:
            return script.sender_replies[address]
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        envelope.postroom_mail_at = time.time()  # type: ignore[attr-defined]
        return "250 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        script = self._server.script
        if script.rcpt_delay_s:
            await asyncio.sleep(script.rcpt_delay_s)
        gate = script.rcpt_gate
        if gate is not None and not gate.is_set():
            self._server.held += 1
            try:
                while not gate.is_set():
                    await asyncio.sleep(0.01)
            finally:
                self._server.held -= 1
        reply = self._server.script.rcpt_reply(address)
        if reply is not None:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname  # what aiosmtpd does itself without this hook
        if self._server.pipelining:  # RFC 2920, before the last line ("250 HELP")
            responses.insert(len(responses) - 1, "250-PIPELINING")
        return responses

    async def handle_RSET(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self._server.rsets += 1
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        script = self._server.script
        if script.drop_data == "before_reply":
            self._server.dropped.append(self._server.record(session, envelope))
            assert server.transport is not None
            server.transport.close()
            await asyncio.Event().wait()  # cancelled when the connection is lost
        if script.data_replies:
            reply = script.data_replies.popleft()
            if not reply.startswith("2"):
                return reply
        else:
            reply = f"250 2.0.0 Ok: queued as {len(self._server.messages) + 1}"
        self._server.messages.append(self._server.record(session, envelope))
        return reply


class _ScriptedSMTP(SMTP):
    def __init__(self, server: ScriptedSmtpServer, handler: _Handler, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._scripted = server

    async def smtp_DATA(self, arg: str) -> None:
        envelope = self.envelope
        if self._scripted.script.data_without_recipients and not (envelope and envelope.rcpt_tos):
            await self.push("354 End data with <CR><LF>.<CR><LF>")
            self._scripted.empty_data.append(await self._reader.readuntil(b".\r\n"))
            await self.push("554 5.5.1 Error: no valid recipients")
            return
        if self._scripted.script.drop_data != "partial" or not (envelope and envelope.rcpt_tos):
            await super().smtp_DATA(arg)
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        await self._reader.readuntil(b"\r\n")
        assert self.transport is not None
        self.transport.close()
        await asyncio.Event().wait()  # cancelled when the connection is lost


class _Controller(Controller):
    def __init__(self, server: ScriptedSmtpServer, **kwargs: Any) -> None:
        super().__init__(_Handler(server), **kwargs)
        self._scripted = server

    def factory(self) -> SMTP:
        self._scripted.connections += 1
        return _ScriptedSMTP(self._scripted, self.handler, **self.SMTP_kwargs)


@dataclass(frozen=True)
class TlsFiles:
    """A test CA and a server certificate it signed for ``localhost`` and 127.0.0.1."""

    ca_file: Path
    cert_file: Path
    key_file: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert_file, self.key_file)
        return context

    def client_context(self) -> ssl.SSLContext:
        """A verifying client context that trusts only the test CA."""
        return ssl.create_default_context(cafile=str(self.ca_file))


def make_tls_files(directory: Path) -> TlsFiles:
    """Write ``ca.pem``, ``server.pem`` and ``server.key`` (EC P-256, valid for one day)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "postroom test CA")])
    ca_cert = (
        _builder(ca_name, ca_name, ca_key.public_key(), now)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(LOOPBACK))]
    authority = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    cert = (
        _builder(name, ca_name, key.public_key(), now)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(authority, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    files = TlsFiles(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    files.ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return files


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    now: datetime.datetime,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


class ScriptedSmtpServer:
    """An aiosmtpd server on 127.0.0.1 that records messages and follows a :class:`Script`.

    ``tls``: ``"starttls"`` offers STARTTLS, ``"implicit"`` speaks TLS from the first byte
    (both need ``tls_files``); ``auth``: ``(user, password)`` offers AUTH PLAIN/LOGIN even
    without TLS (loopback tests); ``pipelining``: the EHLO reply offers PIPELINING (aiosmtpd
    reads pipelined commands in turn either way).
    """

    def __init__(
        self,
        *,
        tls: Literal["starttls", "implicit"] | None = None,
        tls_files: TlsFiles | None = None,
        auth: tuple[str, str] | None = None,
        script: Script | None = None,
        pipelining: bool = False,
    ) -> None:
        if tls and tls_files is None:
            raise ValueError("tls needs tls_files")
        self.host = LOOPBACK
        self.port = free_port()
        self.script = script or Script()
        self.messages: list[Received] = []
        self.dropped: list[Received] = []
        self.logins: list[tuple[str, bool]] = []  # (user tried, accepted)
        self.connections = 0
        self.rsets = 0
        self.held = 0  # sessions waiting at the script's rcpt_gate now
        self.pipelining = pipelining
        self.empty_data: list[bytes] = []  # what followed a 354 without recipients
        self._auth = auth
        kwargs: dict[str, Any] = {"server_hostname": "localhost"}
        if tls == "starttls":
            assert tls_files is not None
            kwargs["tls_context"] = tls_files.server_context()
        elif tls == "implicit":
            assert tls_files is not None
            kwargs["ssl_context"] = tls_files.server_context()
        if auth is not None:
            kwargs.update(authenticator=self._authenticate, auth_require_tls=False)
        self._controller = _Controller(self, hostname=self.host, port=self.port, **kwargs)

    def start(self) -> ScriptedSmtpServer:
        self._controller.start()
        self.connections = 0  # the controller's own start-up probe does not count
        return self

    def stop(self) -> None:
        self._controller.stop()

    def __enter__(self) -> ScriptedSmtpServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def record(self, session: Session, envelope: Envelope) -> Received:
        data = envelope.original_content or b""
        headers = BytesHeaderParser().parsebytes(data)
        login = session.auth_data.login.decode() if session.auth_data else None
        return Received(
            mail_from=envelope.mail_from or "",
            rcpt_tos=list(envelope.rcpt_tos),
            data=data,
            message_id=headers.get("Message-ID"),
            received_at=time.time(),
            login=login,
            mail_at=getattr(envelope, "postroom_mail_at", 0.0),
        )

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        assert self._auth is not None
        if not isinstance(data, LoginPassword):
            return AuthResult(success=False, handled=False)
        user, password = data.login.decode(), data.password.decode()
        ok = (user, password) == self._auth
        self.logins.append((user, ok))
        return AuthResult(success=ok, handled=False, auth_data=data if ok else None)


class SilentServer:
    """Listens on 127.0.0.1 and never answers: the kernel completes the TCP handshake from
    the backlog, nobody ever reads or writes. Closing it resets the waiting clients."""

    def __init__(self) -> None:
        self.host = LOOPBACK
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind((self.host, 0))
        self.port: int = self._sock.getsockname()[1]

    def start(self) -> SilentServer:
        self._sock.listen(16)
        return self

    def stop(self) -> None:
        self._sock.close()

    def __enter__(self) -> SilentServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
