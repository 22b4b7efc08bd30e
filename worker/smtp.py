"""One SMTP conversation with a relay: connect, TLS, AUTH, and transactions.

``scheme`` ``"smtp"`` requires STARTTLS (never silently plain), ``"smtps"`` is implicit TLS,
``""`` is plain text. Certificates are verified against the relay's host name even when the
connection goes to an address checked beforehand. A relay that offers PIPELINING (RFC 2920)
gets each transaction's envelope and DATA in one write. Every exception leaving this module is a
:class:`postroom.shared.errors.SendError`, classified by :mod:`postroom.worker.outcomes`, and none
carries the
relay's password.
"""

from __future__ import annotations

import re
import smtplib
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from postroom.shared.errors import ConfigError, SendError
from postroom.shared.relays import Relay
from postroom.worker import outcomes
from postroom.worker.outcomes import Condition

QUIT_TIMEOUT_S = 5.0
Reply = tuple[int, bytes]  # an SMTP reply as smtplib gives it


@dataclass(frozen=True)
class DeliveryResult:
    """What one transaction did. Replies are kept as ``"550 5.1.1 text"`` lines; ``rejected``
    holds the 5xx RCPT replies, ``deferred`` the 4xx ones (worth another attempt)."""

    accepted: list[str]
    rejected: list[tuple[str, int, str]]
    deferred: list[tuple[str, int, str]]
    response: str  # the reply to the end of DATA, e.g. "250 2.0.0 Ok: queued as X"


def make_ssl_context(ca_file: str | None) -> ssl.SSLContext:
    """A verifying client context: the system CAs, plus ``ca_file`` (PEM) when given."""
    context = ssl.create_default_context()  # CERT_REQUIRED, check_hostname, TLS >= 1.2
    if ca_file:
        try:
            context.load_verify_locations(cafile=ca_file)
        except (OSError, ssl.SSLError) as exc:
            reason = getattr(exc, "strerror", None) or "not a PEM certificate bundle"
            raise ConfigError(f"POSTROOM_SMTP_CA_FILE {ca_file!r}: {reason}") from None
    return context


#: the AUTH mechanisms ``smtplib.SMTP.login`` tries, in its order (documented with it)
LOGIN_MECHANISMS = ("CRAM-MD5", "PLAIN", "LOGIN")


class _Client(smtplib.SMTP):
    """``smtplib.SMTP`` that may connect to an address while TLS (SNI and certificate
    checks, for STARTTLS and implicit TLS alike) uses the relay's host name."""

    def __init__(
        self,
        *,
        tls_hostname: str,
        implicit_tls: ssl.SSLContext | None,
        local_hostname: str,
        timeout: float,
    ) -> None:
        super().__init__(local_hostname=local_hostname, timeout=timeout)
        self._host = tls_hostname  # what smtplib's starttls() passes as server_hostname
        self._implicit_tls = implicit_tls
        #: ``time.monotonic()`` by which the current exchange must end (None: no bound)
        self.deadline: float | None = None

    def left(self) -> float:
        """The time this exchange may still wait (``timeout`` at most); raises
        ``TimeoutError`` once the deadline has passed."""
        if self.deadline is None:
            return float(self.timeout)
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the send deadline passed")
        return min(float(self.timeout), left)

    def past_deadline(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def _bound(self) -> None:
        left = self.left()
        if self.sock is not None:
            self.sock.settimeout(left)

    # every write and every wait for a reply is bounded by what is left of the deadline;
    # a reply already read is never turned into an error afterwards
    def send(self, s: bytes | str) -> None:  # type: ignore[override]
        self._bound()
        super().send(s)

    def getreply(self) -> tuple[int, bytes]:
        self._bound()
        return super().getreply()

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        timeout = min(timeout, self.left())
        sock: socket.socket = super()._get_socket(host, port, timeout)  # type: ignore[misc]
        if self._implicit_tls is None:
            return sock
        try:
            return self._implicit_tls.wrap_socket(sock, server_hostname=self._host)
        except BaseException:
            sock.close()
            raise


class SmtpConnection:
    """An open, logged-in SMTP session that can carry several transactions in turn."""

    def __init__(self) -> None:
        self._client: _Client | None = None
        self._secret: str | None = None

    def open(
        self,
        relay: Relay,
        *,
        connect_host: str | None,
        timeout: float,
        ssl_context: ssl.SSLContext,
        local_hostname: str,
        deadline: float | None = None,
    ) -> None:
        """Connect to ``connect_host`` (the checked address; ``relay.host`` when ``None``),
        say EHLO as ``local_hostname``, start TLS as the scheme says, and log in; all of it
        before ``deadline`` (``time.monotonic()``), when given."""
        if relay.scheme not in ("smtp", "smtps", ""):
            raise ValueError(f"unknown relay scheme {relay.scheme!r}")
        if self._client is not None:
            raise RuntimeError("the connection is already open")
        self._secret = relay.password
        client = _Client(
            tls_hostname=relay.host,
            implicit_tls=ssl_context if relay.scheme == "smtps" else None,
            local_hostname=local_hostname,
            timeout=timeout,
        )
        client.deadline = deadline
        self._client = client
        try:
            with self._errors(connecting=True):
                code, reply = client.connect(connect_host or relay.host, relay.port)
                if code != 220:
                    raise smtplib.SMTPConnectError(code, reply)
            with self._errors():
                self._hello(client)
                if relay.scheme == "smtp":
                    self._starttls(client, ssl_context)
                if relay.user:
                    self._login(client, relay.user, relay.password or "")
        except SendError:
            self._drop()
            raise

    @property
    def pipelining(self) -> bool:
        """Whether the relay offers PIPELINING (RFC 2920) on this open session."""
        return self._client is not None and bool(self._client.has_extn("pipelining"))

    def envelope(self, sender: str, recipients: list[str], size: int) -> bytes:
        """The pipelined group ``MAIL FROM``, every ``RCPT TO`` and ``DATA`` of a message of
        ``size`` bytes, as this session would write it (RFC 2920), spelled as ``smtplib``
        spells the commands one at a time; :class:`SendError` for an envelope this relay
        cannot take (a line break in an address, non-ASCII without SMTPUTF8)."""
        client = self._require()
        options = self._options(client, sender, recipients, size)
        optionlist = (" " + " ".join(options)) if options else ""
        lines = [f"mail FROM:{smtplib.quoteaddr(sender)}{optionlist}"]
        lines += [f"rcpt TO:{smtplib.quoteaddr(address)}" for address in recipients]
        lines.append("data")
        encoding = "utf-8" if "SMTPUTF8" in options else "ascii"
        return "".join(f"{line}\r\n" for line in lines).encode(encoding)

    @staticmethod
    def _options(client: _Client, sender: str, recipients: list[str], size: int) -> list[str]:
        if not recipients:
            raise ValueError("a transaction needs at least one recipient")
        envelope = [sender, *recipients]
        if any(ch in address for address in envelope for ch in "\r\n\0"):
            raise outcomes.from_condition(Condition.BAD_ENVELOPE)
        options = [f"SIZE={size}"] if client.has_extn("size") else []
        if not all(address.isascii() for address in envelope):
            if not client.has_extn("smtputf8"):
                raise outcomes.from_condition(Condition.NO_SMTPUTF8)
            options.append("SMTPUTF8")
        return options

    def transaction(
        self,
        sender: str,
        recipients: list[str],
        data: bytes,
        *,
        envelope_sent: bool = False,
        then: Callable[[], bytes] | None = None,
    ) -> DeliveryResult:
        """MAIL FROM, RCPT TO each recipient, and DATA when at least one was accepted.

        With a relay that offers PIPELINING (RFC 2920) the envelope and DATA go out in one
        write and their replies are read together: two round trips per message instead of
        three plus one per recipient, the same replies, the same outcomes.

        ``envelope_sent``: that group (:meth:`envelope`) was already written on this
        session, after the previous message's final dot; only its replies are read here.
        ``then``: called just before the message and its final dot are written; the bytes
        it gives (the next message's envelope group, or nothing) go out in the same write,
        as RFC 2920 allows, so that in steady state a message costs one round trip. Its
        replies follow this message's own and are left for the next transaction to read.

        All recipients refused: :class:`SmtpRejected` (the first 5xx), or, when some were
        only deferred (4xx), a :class:`TransientSendError` naming them. After a refused
        transaction the session is reset, so the connection stays usable.
        """
        client = self._require()
        options = self._options(client, sender, recipients, len(data))
        with self._errors():
            if envelope_sent:
                mail, rcpts, data_reply = _envelope_replies(client, recipients)
            else:
                send_envelope = (
                    _pipelined_envelope if client.has_extn("pipelining") else _envelope
                )
                mail, rcpts, data_reply = send_envelope(client, sender, options, recipients)
            accepted: list[str] = []
            rejected: list[tuple[str, int, str]] = []
            deferred: list[tuple[str, int, str]] = []
            for address, (code, reply) in zip(recipients, rcpts, strict=False):
                if 200 <= code < 300:
                    accepted.append(address)
                elif 500 <= code < 600:
                    rejected.append((address, code, outcomes.reply_text(code, reply)))
                else:
                    deferred.append((address, code, outcomes.reply_text(code, reply)))
            if mail[0] != 250 or not accepted:
                if data_reply is not None and data_reply[0] == 354:
                    client.send(b".\r\n")  # RFC 2920: end the empty message the relay
                    client.getreply()  # took DATA for; it refuses it, nothing is sent
                self._abandon(client)
                if mail[0] != 250:
                    raise outcomes.from_reply(*mail)
                raise _refused(rejected, deferred)
            self._body_starts()
            if data_reply is None:
                try:
                    code, reply = client.data(data)
                except smtplib.SMTPDataError as exc:  # the reply to DATA itself was not 354
                    self._abandon(client)
                    raise outcomes.from_exception(exc) from None
            elif data_reply[0] != 354:
                self._abandon(client)
                raise outcomes.from_exception(smtplib.SMTPDataError(*data_reply)) from None
            else:
                code, reply = _body(client, data, then)
            if code != 250:
                raise outcomes.from_reply(code, reply)
        return DeliveryResult(accepted, rejected, deferred, outcomes.reply_text(code, reply))

    def set_deadline(self, deadline: float | None) -> None:
        """Bound the exchanges from now on: all must end by ``deadline``
        (``time.monotonic()``); None lifts the bound."""
        if self._client is not None:
            self._client.deadline = deadline

    def _body_starts(self) -> None:
        """Called just before the message may reach the relay (the DATA command without
        PIPELINING, the message itself with it)."""

    def reset(self) -> None:
        """RSET: end any transaction in progress."""
        client = self._require()
        with self._errors():
            code, reply = client.rset()
            if code != 250:
                raise outcomes.from_reply(code, reply)

    def is_alive(self) -> bool:
        """NOOP answered with 250; a dead connection is closed and reported ``False``."""
        if self._client is None:
            return False
        try:
            code, _ = self._client.noop()
        except OSError:
            self._drop()
            return False
        return code == 250

    def close(self) -> None:
        """QUIT (errors ignored, at most a few seconds) and close the socket."""
        client = self._client
        if client is None:
            return
        try:
            if client.sock is not None:
                client.sock.settimeout(min(QUIT_TIMEOUT_S, client.timeout))
            client.quit()
        except OSError:
            pass
        finally:
            self._drop()

    def __enter__(self) -> SmtpConnection:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------

    def _require(self) -> _Client:
        if self._client is None:
            raise RuntimeError("the connection is not open")
        return self._client

    def _drop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()

    def _abandon(self, client: _Client) -> None:
        """RSET after a refused transaction; a relay that fails even that is dropped."""
        try:
            client.rset()
        except OSError:
            self._drop()

    @contextmanager
    def _errors(self, *, connecting: bool = False) -> Iterator[None]:
        """Turn ``smtplib``/``ssl``/``socket`` exceptions (all ``OSError``) into SendErrors
        without the password; a broken connection is dropped."""
        try:
            yield
        except SendError as exc:
            outcomes.redact(exc, self._secret)
            raise
        except OSError as exc:
            late = self._client is not None and self._client.past_deadline()
            self._drop()
            if late:
                raise outcomes.from_condition(Condition.DEADLINE) from None
            error = outcomes.from_exception(exc, connecting=connecting)
            outcomes.redact(error, self._secret)
            if self._secret and self._secret in str(exc):
                raise error from None
            raise error from exc

    @staticmethod
    def _hello(client: _Client) -> None:
        code, reply = client.ehlo()
        if code != 250:
            code, reply = client.helo()
            if code != 250:
                raise outcomes.from_reply(code, reply)

    def _starttls(self, client: _Client, context: ssl.SSLContext) -> None:
        if not client.has_extn("starttls"):
            raise outcomes.from_condition(Condition.NO_STARTTLS)
        code, reply = client.starttls(context=context)
        if code != 220:
            if 400 <= code < 500:
                raise outcomes.from_reply(code, reply)
            response = outcomes.reply_text(code, reply)
            raise outcomes.from_condition(
                Condition.NO_STARTTLS, smtp_code=code, smtp_response=response
            )
        self._hello(client)

    @staticmethod
    def _login(client: _Client, user: str, password: str) -> None:
        """AUTH, after checking what the relay offers (its EHLO's AUTH line) against the
        mechanisms ``login`` can use: a relay without AUTH, or without one of those, is
        told apart here rather than by the type of the exception ``login`` raises."""
        if not client.has_extn("auth"):
            raise outcomes.from_condition(Condition.NO_AUTH)
        offered = set((client.esmtp_features.get("auth") or "").upper().split())
        if not offered & set(LOGIN_MECHANISMS):
            raise outcomes.from_condition(Condition.NO_AUTH_MECHANISM)
        try:
            client.login(user, password)
        except UnicodeEncodeError:  # its text would quote the password
            raise outcomes.from_condition(Condition.CREDENTIALS_NOT_ASCII) from None


def _envelope(
    client: _Client, sender: str, options: list[str], recipients: list[str]
) -> tuple[Reply, list[Reply], Reply | None]:
    """MAIL FROM, then RCPT TO each recipient, each waiting for its reply (no RCPT after a
    refused MAIL); DATA is left to ``client.data``."""
    mail = client.mail(sender, options)
    if mail[0] != 250:
        return mail, [], None
    return mail, [client.rcpt(address) for address in recipients], None


def _pipelined_envelope(
    client: _Client, sender: str, options: list[str], recipients: list[str]
) -> tuple[Reply, list[Reply], Reply | None]:
    """MAIL FROM, every RCPT TO and DATA in one write (RFC 2920), then their replies, in
    order. The commands are spelled as ``smtplib`` spells them one at a time."""
    if "SMTPUTF8" in options:
        client.command_encoding = "utf-8"  # as smtplib's mail() does for SMTPUTF8
    optionlist = (" " + " ".join(options)) if options else ""
    lines = [f"mail FROM:{smtplib.quoteaddr(sender)}{optionlist}"]
    lines += [f"rcpt TO:{smtplib.quoteaddr(address)}" for address in recipients]
    lines.append("data")
    client.send("".join(f"{line}\r\n" for line in lines))
    return _envelope_replies(client, recipients)


def _envelope_replies(
    client: _Client, recipients: list[str]
) -> tuple[Reply, list[Reply], Reply | None]:
    """The replies to a pipelined envelope group, in order: MAIL, each RCPT, DATA."""
    mail = client.getreply()
    rcpts = [client.getreply() for _ in recipients]
    return mail, rcpts, client.getreply()


_LEADING_DOT = re.compile(rb"(?m)^\.")


def _body(client: _Client, data: bytes, then: Callable[[], bytes] | None = None) -> Reply:
    """The message after a 354 (dot-stuffed, ended by CRLF . CRLF) and the relay's reply,
    as ``smtplib``'s ``data()`` sends it; with what ``then()`` gives written after the dot
    in the same write (the next envelope group, whose replies follow this one's)."""
    body = _LEADING_DOT.sub(b"..", data)
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    client.send(body + b".\r\n" + (then() if then is not None else b""))
    return client.getreply()


def _refused(
    rejected: list[tuple[str, int, str]], deferred: list[tuple[str, int, str]]
) -> SendError:
    """The error for a transaction in which no recipient was accepted."""
    _, code, response = (deferred or rejected)[0]
    error = outcomes.from_reply(code, response.removeprefix(str(code)).strip())
    error.extra["rejected"] = [address for address, _, _ in rejected]
    error.rcpt_rejections = {address: (code, reply) for address, code, reply in rejected}
    if deferred:
        error.extra["deferred"] = [address for address, _, _ in deferred]
    return error


def deliver(
    relay: Relay,
    *,
    connect_host: str | None,
    sender: str,
    recipients: list[str],
    data: bytes,
    timeout: float,
    ssl_context: ssl.SSLContext,
    local_hostname: str,
) -> DeliveryResult:
    """Open a connection, run one transaction, and close it."""
    connection = SmtpConnection()
    connection.open(
        relay,
        connect_host=connect_host,
        timeout=timeout,
        ssl_context=ssl_context,
        local_hostname=local_hostname,
    )
    try:
        return connection.transaction(sender, recipients, data)
    finally:
        connection.close()
