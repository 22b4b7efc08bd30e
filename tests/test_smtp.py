"""SMTP delivery (postroom.worker.smtp) and outcome classification (postroom.worker.outcomes),
against a real
aiosmtpd server on loopback."""

from __future__ import annotations

import json
import ssl
import time
import traceback
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime

import pytest

from postroom.dev.embedded_redis import free_port
from postroom.shared.errors import (
    SendError,
    SmtpAuthFailed,
    SmtpRejected,
    TlsError,
    TransientSendError,
)
from postroom.shared.relays import Relay
from postroom.worker import outcomes
from postroom.worker.message import build_message
from postroom.worker.smtp import DeliveryResult, SmtpConnection, deliver, make_ssl_context
from tests.smtp_server import DropMode, ScriptedSmtpServer, SilentServer, TlsFiles

SENDER = "sender@example.com"
ALICE, BOB, CAROL = "alice@example.com", "bob@example.com", "carol@example.com"
PASSWORD = "s3cret-Passw0rd"
MakeServer = Callable[..., ScriptedSmtpServer]
DATE = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)


def message(message_id: str = "<m1@example.com>") -> bytes:
    return build_message(
        sender=SENDER,
        to=[ALICE],
        cc=[],
        subject="Hi",
        text="Hello",
        html=None,
        message_id=message_id,
        date=DATE,  # the same bytes however often, and whenever, it is built
    )


def send(
    port: int,
    *,
    scheme: str = "",
    host: str = "localhost",
    user: str | None = None,
    password: str | None = None,
    recipients: list[str] | None = None,
    ssl_context: ssl.SSLContext | None = None,
    timeout: float = 5.0,
) -> DeliveryResult:
    relay = Relay(host=host, port=port, scheme=scheme, user=user, password=password)
    return deliver(
        relay,
        connect_host="127.0.0.1",
        sender=SENDER,
        recipients=recipients or [ALICE],
        data=message(),
        timeout=timeout,
        ssl_context=ssl_context or make_ssl_context(None),
        local_hostname="worker.test",
    )


@pytest.fixture(params=[False, True], ids=["one-by-one", "pipelining"])
def smtp_server(request: pytest.FixtureRequest, make_smtp_server: MakeServer) -> ScriptedSmtpServer:
    """A plain-text server that accepts everything (script it at will), once without and
    once with PIPELINING on offer: every transaction here must end the same either way."""
    return make_smtp_server(pipelining=request.param)


def shown(error: SendError) -> str:
    """Everything a caller or a log could see of an error."""
    return json.dumps(error.body()) + "".join(traceback.format_exception(error))


# -- delivery -----------------------------------------------------------------------


def opened(server: ScriptedSmtpServer) -> SmtpConnection:
    """A plain-text session with ``server``, logged in and ready for transactions."""
    conn = SmtpConnection()
    conn.open(Relay(host="localhost", port=server.port, scheme=""), connect_host="127.0.0.1",
              timeout=5.0, ssl_context=make_ssl_context(None), local_hostname="worker.test")
    return conn


class Writes:
    """Counts what a connection's client writes to the relay (each one a wait for it)."""

    def __init__(self, conn: SmtpConnection, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        client = conn._client
        assert client is not None
        send_ = client.send

        def counted(data: bytes | str) -> None:
            self.count += 1
            send_(data)

        monkeypatch.setattr(client, "send", counted)


@pytest.mark.parametrize("pipelining, writes", [(False, 6), (True, 2)])
def test_pipelining_sends_the_envelope_in_one_write(
    make_smtp_server: MakeServer, monkeypatch: pytest.MonkeyPatch, pipelining: bool,
    writes: int,
) -> None:
    """A relay that offers PIPELINING gets MAIL FROM, the three RCPT TO and DATA in one write
    and the message in a second; one that does not, a write (and a wait) per command."""
    server = make_smtp_server(pipelining=pipelining)
    conn = opened(server)
    try:
        counted = Writes(conn, monkeypatch)
        result = conn.transaction(SENDER, [ALICE, BOB, CAROL], message())
        assert writes == counted.count
    finally:
        conn.close()
    assert [ALICE, BOB, CAROL] == result.accepted
    assert [[ALICE, BOB, CAROL]] == [m.rcpt_tos for m in server.messages]


def test_data_taken_without_recipients_is_ended_empty(make_smtp_server: MakeServer) -> None:
    """Every recipient refused, and the relay answers the pipelined DATA with 354 anyway:
    the client ends the empty message at once (the relay refuses it), resets, and reports
    the refusal; nothing is delivered and the connection carries the next message."""
    server = make_smtp_server(pipelining=True)
    server.script.data_without_recipients = True
    server.script.rcpt_replies = {ALICE: "550 5.1.1 no such user"}
    conn = opened(server)
    try:
        with pytest.raises(SmtpRejected) as caught:
            conn.transaction(SENDER, [ALICE], message())
        assert [b".\r\n"] == server.empty_data
        assert 550 == caught.value.extra["smtp_code"]
        assert [] == server.messages
        assert [BOB] == conn.transaction(SENDER, [BOB], message("<m2@example.com>")).accepted
    finally:
        conn.close()
    assert ["<m2@example.com>"] == [m.message_id for m in server.messages]


def test_delivery_success(smtp_server: ScriptedSmtpServer) -> None:
    """Every recipient accepted: the message arrives once with the envelope given, and the
    result carries the reply to the end of DATA."""
    result = send(smtp_server.port, recipients=[ALICE, BOB])

    assert result == DeliveryResult(
        accepted=[ALICE, BOB], rejected=[], deferred=[], response="250 2.0.0 Ok: queued as 1"
    )
    [received] = smtp_server.messages
    assert (received.mail_from, received.rcpt_tos) == (SENDER, [ALICE, BOB])
    assert received.message_id == "<m1@example.com>"
    assert received.data == message()


def test_partial_rejection_still_sends(smtp_server: ScriptedSmtpServer) -> None:
    """A 550 for one recipient and a 451 for another: the message goes to the rest, and the
    result lists the rejected and the deferred with their replies."""
    smtp_server.script.rcpt_replies = {BOB: "550 5.1.1 no such user", CAROL: "451 4.7.1 later"}

    result = send(smtp_server.port, recipients=[ALICE, BOB, CAROL])

    assert result.accepted == [ALICE]
    assert result.rejected == [(BOB, 550, "550 5.1.1 no such user")]
    assert result.deferred == [(CAROL, 451, "451 4.7.1 later")]
    assert [m.rcpt_tos for m in smtp_server.messages] == [[ALICE]]


def test_all_rejected_raises_smtp_rejected(smtp_server: ScriptedSmtpServer) -> None:
    """Every recipient refused with 5xx: SmtpRejected with the first reply's code, and no
    DATA is sent."""
    smtp_server.script.rcpt_replies = lambda address: f"550 5.1.1 <{address}> unknown"

    with pytest.raises(SmtpRejected) as caught:
        send(smtp_server.port, recipients=[ALICE, BOB])

    assert caught.value.extra["smtp_code"] == 550
    assert caught.value.extra["smtp_response"] == f"550 5.1.1 <{ALICE}> unknown"
    assert caught.value.extra["rejected"] == [ALICE, BOB]
    assert smtp_server.messages == []


def test_rejected_and_deferred_only_is_transient(smtp_server: ScriptedSmtpServer) -> None:
    """No recipient accepted but one only deferred (4xx): a transient error naming the
    deferred and the rejected recipients, with the relay's retry hint."""
    smtp_server.script.rcpt_replies = {
        ALICE: "550 5.1.1 no such user",
        BOB: "450 4.2.0 greylisted, try again in 120 seconds",
    }

    with pytest.raises(TransientSendError) as caught:
        send(smtp_server.port, recipients=[ALICE, BOB])

    assert caught.value.extra["deferred"] == [BOB]
    assert caught.value.extra["rejected"] == [ALICE]
    assert caught.value.retry_after == 120.0
    assert smtp_server.messages == []


@pytest.mark.parametrize(
    ("reply", "retry_after"),
    [("451 4.3.0 local error, try again in 30 seconds", 30.0), ("452 4.3.1 full", None)],
)
def test_4xx_on_data_is_transient(
    smtp_server: ScriptedSmtpServer, reply: str, retry_after: float | None
) -> None:
    """A 4xx reply to the end of DATA is a TransientSendError carrying code, reply and any
    "try again in N seconds" hint."""
    smtp_server.script.data_replies = deque([reply])

    with pytest.raises(TransientSendError) as caught:
        send(smtp_server.port)

    assert caught.value.extra["smtp_code"] == int(reply[:3])
    assert caught.value.extra["smtp_response"] == reply
    assert caught.value.retry_after == retry_after


def test_421_is_transient(smtp_server: ScriptedSmtpServer) -> None:
    """421 (service closing) to MAIL FROM is transient, not a rejection."""
    smtp_server.script.mail_replies = deque(["421 4.3.2 shutting down"])

    with pytest.raises(TransientSendError) as caught:
        send(smtp_server.port)

    assert caught.value.extra["smtp_code"] == 421


def test_5xx_on_data_is_permanent(smtp_server: ScriptedSmtpServer) -> None:
    """A 5xx reply to the end of DATA is SmtpRejected with that code."""
    smtp_server.script.data_replies = deque(["554 5.7.1 looks like spam"])

    with pytest.raises(SmtpRejected) as caught:
        send(smtp_server.port)

    assert caught.value.extra["smtp_code"] == 554
    assert caught.value.status == 502


@pytest.mark.parametrize("mode", ["partial", "before_reply"])
def test_drop_during_data_is_transient(smtp_server: ScriptedSmtpServer, mode: DropMode) -> None:
    """The relay hanging up during DATA (part-way, or after the data but before its reply)
    is transient, like a 451."""
    smtp_server.script.drop_data = mode

    with pytest.raises(TransientSendError):
        send(smtp_server.port)

    assert smtp_server.messages == []


def test_non_ascii_address_uses_smtputf8(smtp_server: ScriptedSmtpServer) -> None:
    """An internationalized address goes out with SMTPUTF8 when the relay offers it."""
    result = send(smtp_server.port, recipients=["jürgen@example.com"])

    assert result.accepted == ["jürgen@example.com"]
    assert smtp_server.messages[0].rcpt_tos == ["jürgen@example.com"]


def test_line_break_in_envelope_is_refused(smtp_server: ScriptedSmtpServer) -> None:
    """An envelope address with a line break never reaches the relay as a command."""
    with pytest.raises(SmtpRejected):
        send(smtp_server.port, recipients=[f"{ALICE}\r\nRCPT TO:<spy@example.com>"])

    assert smtp_server.messages == []


# -- connecting -----------------------------------------------------------------------


def test_connection_refused_is_transient_and_generic(closed_port: int) -> None:
    """A refused connection is transient, with the generic text and no socket error."""
    with pytest.raises(TransientSendError) as caught:
        send(closed_port)

    assert caught.value.message == outcomes.CONNECT_FAILED
    assert "refused" not in json.dumps(caught.value.body()).lower()


def test_silent_server_times_out_within_bound(silent_server: SilentServer) -> None:
    """A server that accepts TCP but never greets fails after about the timeout, transient,
    with the same generic text as a refused connection (no port-scan signal)."""
    started = time.monotonic()
    with pytest.raises(TransientSendError) as caught:
        send(silent_server.port, timeout=1.0)

    assert time.monotonic() - started < 4.0
    assert caught.value.message == outcomes.CONNECT_FAILED


# -- TLS ----------------------------------------------------------------------------------


def test_starttls_with_test_ca(make_smtp_server: MakeServer, tls_files: TlsFiles) -> None:
    """scheme smtp upgrades with STARTTLS and verifies the relay against an extra CA file,
    by the relay's name although the connection goes to its address."""
    server = make_smtp_server(tls="starttls")

    send(server.port, scheme="smtp", ssl_context=make_ssl_context(str(tls_files.ca_file)))

    assert len(server.messages) == 1


def test_starttls_untrusted_certificate_is_tls_error(make_smtp_server: MakeServer) -> None:
    """With only the default CAs a self-made certificate fails verification: TlsError,
    nothing delivered."""
    server = make_smtp_server(tls="starttls")

    with pytest.raises(TlsError) as caught:
        send(server.port, scheme="smtp")

    assert "certificate" in caught.value.message
    assert server.messages == []


def test_certificate_name_mismatch_is_tls_error(
    make_smtp_server: MakeServer, tls_files: TlsFiles
) -> None:
    """The certificate is checked against the relay's host name, not the connected address."""
    server = make_smtp_server(tls="starttls")

    with pytest.raises(TlsError):
        send(
            server.port,
            scheme="smtp",
            host="mail.example.net",
            ssl_context=tls_files.client_context(),
        )

    assert server.messages == []


def test_scheme_smtp_without_starttls_is_tls_error(make_smtp_server: MakeServer) -> None:
    """scheme smtp against a relay without STARTTLS is a TlsError: never silently plain text,
    no credentials sent, no message delivered."""
    server = make_smtp_server(auth=("user", PASSWORD))

    with pytest.raises(TlsError):
        send(server.port, scheme="smtp", user="user", password=PASSWORD)

    assert server.logins == []
    assert server.messages == []


def test_smtps_implicit_tls(make_smtp_server: MakeServer, tls_files: TlsFiles) -> None:
    """scheme smtps speaks TLS from the first byte and verifies the certificate."""
    server = make_smtp_server(tls="implicit")

    send(server.port, scheme="smtps", ssl_context=tls_files.client_context())

    assert len(server.messages) == 1


def test_extra_ca_keeps_default_cas(tls_files: TlsFiles) -> None:
    """An extra CA file adds to the system CAs rather than replacing them."""
    default = make_ssl_context(None).cert_store_stats()["x509_ca"]

    extended = make_ssl_context(str(tls_files.ca_file))

    assert extended.cert_store_stats()["x509_ca"] == default + 1
    assert extended.verify_mode == ssl.CERT_REQUIRED and extended.check_hostname


# -- AUTH -----------------------------------------------------------------------------


def test_auth_success(make_smtp_server: MakeServer) -> None:
    """With a user configured the connection logs in, and the message is sent as that user."""
    server = make_smtp_server(auth=("user", PASSWORD))

    send(server.port, user="user", password=PASSWORD)

    assert server.logins == [("user", True)]
    assert server.messages[0].login == "user"


def test_wrong_password_is_auth_failed_without_password(make_smtp_server: MakeServer) -> None:
    """A rejected login is SmtpAuthFailed (permanent); neither its text, its body nor its
    traceback holds the password."""
    server = make_smtp_server(auth=("user", "the-right-one"))

    with pytest.raises(SmtpAuthFailed) as caught:
        send(server.port, user="user", password=PASSWORD)

    assert caught.value.extra["smtp_code"] == 535
    assert not caught.value.transient
    assert PASSWORD not in shown(caught.value)
    assert server.messages == []


def test_user_without_auth_offered_is_auth_failed(smtp_server: ScriptedSmtpServer) -> None:
    """A user is configured but the relay offers no AUTH: SmtpAuthFailed, nothing sent."""
    with pytest.raises(SmtpAuthFailed) as caught:
        send(smtp_server.port, user="user", password=PASSWORD)

    assert PASSWORD not in shown(caught.value)
    assert smtp_server.messages == []


def test_user_with_only_unknown_auth_mechanisms_is_auth_failed() -> None:
    """A relay (aiosmtpd) whose AUTH offers only a mechanism smtplib cannot use (XOAUTH2):
    SmtpAuthFailed naming the missing mechanism, decided from the EHLO reply before any
    AUTH command; nothing sent."""
    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import AuthResult

    class Handler:
        messages: list[object] = []
        auth_commands = 0

        async def auth_XOAUTH2(self, server: object, args: list[str]) -> AuthResult:
            Handler.auth_commands += 1
            return AuthResult(success=False)

        async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
            Handler.messages.append(envelope)
            return "250 OK"

    port = free_port()
    controller = Controller(
        Handler(), hostname="127.0.0.1", port=port, auth_require_tls=False,
        auth_exclude_mechanism=["PLAIN", "LOGIN"],
        authenticator=lambda *args: AuthResult(success=False),
    )
    controller.start()
    try:
        with pytest.raises(SmtpAuthFailed) as caught:
            send(port, user="user", password=PASSWORD)
    finally:
        controller.stop()

    assert "no AUTH mechanism we support" in str(caught.value)
    assert (0, []) == (Handler.auth_commands, Handler.messages)
    assert PASSWORD not in shown(caught.value)


def test_the_mechanisms_checked_are_those_smtplib_implements() -> None:
    """``LOGIN_MECHANISMS`` are mechanisms ``smtplib.SMTP`` has an ``auth_*`` method for."""
    import smtplib

    from postroom.worker.smtp import LOGIN_MECHANISMS

    for name in LOGIN_MECHANISMS:
        assert callable(getattr(smtplib.SMTP, "auth_" + name.lower().replace("-", "_")))


# -- a kept connection ---------------------------------------------------------------------


def test_reused_connection_three_transactions(smtp_server: ScriptedSmtpServer) -> None:
    """One connection carries three transactions with RSET between them; a refused one in
    the middle leaves it usable."""
    relay = Relay(host="localhost", port=smtp_server.port, scheme="")
    smtp_server.script.rcpt_replies = lambda a: "550 5.1.1 no" if a == BOB else None
    with SmtpConnection() as connection:
        connection.open(
            relay,
            connect_host="127.0.0.1",
            timeout=5.0,
            ssl_context=make_ssl_context(None),
            local_hostname="worker.test",
        )
        first = connection.transaction(SENDER, [ALICE], message("<1@example.com>"))
        connection.reset()
        with pytest.raises(SmtpRejected):
            connection.transaction(SENDER, [BOB], message("<2@example.com>"))
        connection.reset()
        third = connection.transaction(SENDER, [ALICE], message("<3@example.com>"))
        connection.reset()
        fourth = connection.transaction(SENDER, [CAROL], message("<4@example.com>"))
        assert connection.is_alive()
    assert not connection.is_alive()

    assert [r.accepted for r in (first, third, fourth)] == [[ALICE], [ALICE], [CAROL]]
    assert smtp_server.connections == 1
    assert smtp_server.rsets >= 3
    ids = [m.message_id for m in smtp_server.messages]
    assert ids == ["<1@example.com>", "<3@example.com>", "<4@example.com>"]


# -- the outcome table ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "error"),
    [
        (421, TransientSendError),
        (450, TransientSendError),
        (451, TransientSendError),
        (452, TransientSendError),
        (471, TransientSendError),
        (535, SmtpAuthFailed),
        (550, SmtpRejected),
        (554, SmtpRejected),
        (599, SmtpRejected),
    ],
)
def test_reply_classification(code: int, error: type[SendError]) -> None:
    """4xx replies are transient, 5xx permanent (rejections unless about credentials)."""
    result = outcomes.from_reply(code, b"text")

    assert type(result) is error
    assert result.extra["smtp_code"] == code


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("4.7.1 Greylisted, try again in 300 seconds", 300.0),
        ("please retry in 5 s", 5.0),
        ("Try again after 2 minutes", 120.0),
        ("rate limited, retry in 1 hour", 3600.0),
        ("4.3.0 temporary failure", None),
    ],
)
def test_retry_hint(text: str, seconds: float | None) -> None:
    """Retry hints in reply text become ``retry_after`` seconds."""
    assert outcomes.retry_hint(text) == seconds


def test_redact_removes_password() -> None:
    """A password echoed by a relay (plain or base64, as AUTH sends it) is scrubbed."""
    error = outcomes.from_reply(535, f"bad {PASSWORD} / czNjcmV0LVBhc3N3MHJk")

    outcomes.redact(error, PASSWORD)

    assert PASSWORD not in shown(error)
    assert "czNjcmV0LVBhc3N3MHJk" not in shown(error)
