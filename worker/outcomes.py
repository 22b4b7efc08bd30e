"""Every SMTP outcome decision, in one table: reply codes, exceptions and conditions met in
the SMTP conversation, each mapped to the error a caller sees and whether a retry may help.

Texts shown to callers never carry raw socket error text, and while connecting every
transient failure (refused, reset, filtered, timed out, closed, not an SMTP server) reads
the same, so a relay address cannot be used as a port scanner. Reply text from the relay is
kept (it is what a user needs to fix a rejection), bounded in length.
"""

from __future__ import annotations

import base64
import re
import smtplib
import socket
import ssl
from dataclasses import dataclass
from enum import Enum
from typing import Any

from postroom.shared.errors import (
    SendError,
    SmtpAuthFailed,
    SmtpRejected,
    TlsError,
    TransientSendError,
)

CONNECT_FAILED = "could not connect to the relay"
MAX_REPLY_CHARS = 500


class Condition(Enum):
    """Outcomes that are neither a reply code nor an exception."""

    NO_STARTTLS = "the relay does not offer STARTTLS"
    NO_AUTH = "the relay does not offer AUTH"
    NO_AUTH_MECHANISM = "no mutually supported AUTH mechanism"
    CREDENTIALS_NOT_ASCII = "credentials with non-ASCII characters"
    NO_SMTPUTF8 = "non-ASCII addresses on a relay without SMTPUTF8"
    BAD_ENVELOPE = "an envelope address with control characters"
    DEADLINE = "the exchange outlasted POSTROOM_SEND_DEADLINE_S"


@dataclass(frozen=True)
class Rule:
    error: type[SendError]
    message: str

    @property
    def transient(self) -> bool:
        return self.error.transient


_AGAIN = TransientSendError
_AUTH = SmtpAuthFailed

# Reply codes: the exact code is looked up first, then its class (400, 500); anything else
# (a malformed or out-of-place reply) is the ``None`` rule. Exceptions: the nearest class in
# the exception's MRO wins.
TABLE: dict[int | type[BaseException] | Condition | None, Rule] = {
    421: Rule(_AGAIN, "the relay is not available now"),
    450: Rule(_AGAIN, "the relay deferred the mailbox (busy or greylisted)"),
    451: Rule(_AGAIN, "the relay had a local error"),
    452: Rule(_AGAIN, "the relay has insufficient storage"),
    454: Rule(_AGAIN, "the relay cannot authenticate or start TLS now"),
    400: Rule(_AGAIN, "the relay deferred the message"),
    530: Rule(_AUTH, "the relay requires authentication"),
    534: Rule(_AUTH, "the relay requires a stronger authentication mechanism"),
    535: Rule(_AUTH, "the relay rejected the credentials"),
    538: Rule(TlsError, "the relay requires encryption for authentication"),
    500: Rule(SmtpRejected, "the relay rejected the message"),
    None: Rule(_AGAIN, "the relay gave an unexpected reply"),
    smtplib.SMTPAuthenticationError: Rule(_AUTH, "the relay rejected the credentials"),
    # a relay that hangs up mid-transaction (even mid-DATA) is treated like a 451
    smtplib.SMTPServerDisconnected: Rule(_AGAIN, "the relay closed the connection"),
    smtplib.SMTPException: Rule(_AGAIN, "the SMTP conversation failed"),
    ssl.SSLCertVerificationError: Rule(TlsError, "the relay's TLS certificate is not valid"),
    # a TLS connection cut short (e.g. the relay hangs up mid-DATA) is a lost connection
    ssl.SSLEOFError: Rule(_AGAIN, "the connection to the relay was lost"),
    ssl.SSLZeroReturnError: Rule(_AGAIN, "the connection to the relay was lost"),
    ssl.SSLError: Rule(TlsError, "TLS negotiation with the relay failed"),
    socket.gaierror: Rule(_AGAIN, "could not resolve the relay's host name"),
    TimeoutError: Rule(_AGAIN, "the relay did not answer in time"),
    ConnectionRefusedError: Rule(_AGAIN, CONNECT_FAILED),
    ConnectionResetError: Rule(_AGAIN, "the connection to the relay was lost"),
    OSError: Rule(_AGAIN, "the connection to the relay was lost"),
    Condition.NO_STARTTLS: Rule(TlsError, "the relay does not offer STARTTLS"),
    Condition.NO_AUTH: Rule(_AUTH, "a user is configured but the relay does not offer AUTH"),
    Condition.NO_AUTH_MECHANISM: Rule(_AUTH, "the relay offers no AUTH mechanism we support"),
    Condition.CREDENTIALS_NOT_ASCII: Rule(
        _AUTH, "the user name or password has non-ASCII characters, which AUTH cannot carry"
    ),
    Condition.NO_SMTPUTF8: Rule(
        SmtpRejected, "the relay does not accept non-ASCII addresses (no SMTPUTF8)"
    ),
    Condition.BAD_ENVELOPE: Rule(SmtpRejected, "an envelope address holds control characters"),
    Condition.DEADLINE: Rule(_AGAIN, "the SMTP exchange did not end within the send deadline"),
}

_RETRY_HINT = re.compile(
    r"(?:try(?:\s+again)?|retry|again)\s+(?:in|after)\s+(\d{1,6})\s*"
    r"(seconds?|secs?|s|minutes?|mins?|m|hours?|h)?\b",
    re.IGNORECASE,
)
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600}


def rule_for_reply(code: int) -> Rule:
    return TABLE.get(code) or TABLE.get(code // 100 * 100) or TABLE[None]


def reply_text(code: int, text: bytes | str) -> str:
    """``"550 5.1.1 no such user"``: one line, bounded, as nodemailer's ``response``."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    line = " ".join(text.split())
    return f"{code} {line}"[:MAX_REPLY_CHARS] if line else str(code)


def retry_hint(text: str) -> float | None:
    """Seconds from "try again in 30 seconds", "retry in 5 s", "retry after 2 minutes"."""
    match = _RETRY_HINT.search(text)
    if not match:
        return None
    unit = (match.group(2) or "s")[0].lower()
    return float(int(match.group(1)) * _UNIT_SECONDS[unit])


def from_reply(code: int, text: bytes | str, **extra: Any) -> SendError:
    """The error for a reply a successful transaction did not expect (4xx, 5xx, ...)."""
    rule = rule_for_reply(code)
    response = reply_text(code, text)
    message = f"{rule.message}: {response}"
    return _make(rule, message, smtp_code=code, smtp_response=response, **extra)


def from_exception(exc: BaseException, *, connecting: bool = False) -> SendError:
    """The error for an exception of ``smtplib``, ``ssl`` or ``socket``.

    ``connecting``: the failure came before the relay's greeting; every transient outcome
    then reads :data:`CONNECT_FAILED`, whatever the cause.
    """
    if isinstance(exc, SendError):
        return exc
    if isinstance(exc, smtplib.SMTPResponseException):
        code = exc.smtp_code
        if connecting and not 200 <= code < 600:  # no SMTP greeting at all
            return _make(TABLE[ConnectionRefusedError], CONNECT_FAILED)
        if not isinstance(exc, smtplib.SMTPAuthenticationError) or 400 <= code < 500:
            return from_reply(code, exc.smtp_error)
        rule = TABLE[smtplib.SMTPAuthenticationError]
        response = reply_text(code, exc.smtp_error)
        message = f"{rule.message}: {response}"
        return _make(rule, message, smtp_code=code, smtp_response=response)
    if isinstance(exc, smtplib.SMTPServerDisconnected) and isinstance(exc.__context__, OSError):
        exc = exc.__context__  # smtplib wraps a timeout or reset while reading a reply
    rule = next((TABLE[k] for k in type(exc).__mro__ if k in TABLE), TABLE[OSError])
    message = rule.message
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        message = f"{message} ({exc.verify_message})"
    elif connecting and rule.transient and not isinstance(exc, socket.gaierror):
        message = CONNECT_FAILED
    return _make(rule, message)


def from_condition(condition: Condition, **extra: Any) -> SendError:
    rule = TABLE[condition]
    return _make(rule, rule.message, **extra)


def redact(error: SendError, secret: str | None) -> SendError:
    """Remove a secret (and its base64 form, as AUTH sends it) from the error's texts."""
    if not secret:
        return error
    forms = [secret, base64.b64encode(secret.encode("utf-8")).decode("ascii")]

    def scrub(value: Any) -> Any:
        if isinstance(value, str):
            for form in forms:
                value = value.replace(form, "***")
        return value

    error.message = scrub(error.message)
    error.args = (error.message,)
    error.extra = {key: scrub(value) for key, value in error.extra.items()}
    return error


def _make(rule: Rule, message: str, **extra: Any) -> SendError:
    if issubclass(rule.error, TransientSendError):
        return rule.error(message, retry_after=retry_hint(message), **extra)
    return rule.error(message, **extra)
