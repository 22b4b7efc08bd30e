"""The wire bytes of one message: headers and MIME body, CRLF line endings, UTF-8 throughout.

The message is written directly rather than through ``email.message.EmailMessage``: that
class costs about 1 ms per message, and it decodes RFC 2047 encoded-words in a subject and
folds the decoded text back out, so ``=?UTF-8?Q?=0D=0A?=Bcc: x`` would become a real header.
Here a subject that is not plain printable ASCII is always written as encoded-words, and the
output is checked by the ``email`` parser in the tests. Bcc is an envelope matter only: it is
never a parameter here, so it can never reach the headers.
"""

from __future__ import annotations

import base64
import binascii
import uuid
from datetime import UTC, datetime
from email.header import Header
from email.utils import format_datetime

CRLF = b"\r\n"
MAX_LINE = 78  # RFC 5322 2.1.1: lines SHOULD be at most 78 characters
_NON_ASCII = bytes(range(128))  # bytes.translate(None, _NON_ASCII) keeps only bytes >= 0x80
_PLAIN_SUBJECT = frozenset(map(chr, range(0x20, 0x7F)))


def build_message(
    *,
    sender: str,
    to: list[str],
    cc: list[str],
    subject: str | None,
    text: str | None,
    html: str | None,
    message_id: str,
    date: datetime | None = None,
) -> bytes:
    """The message as bytes ready for SMTP ``DATA`` (CRLF line endings, 7-bit clean unless an
    address is non-ASCII, which only an SMTPUTF8 relay is then asked to carry)."""
    for address in (sender, *to, *cc):
        _check_address(address)
    if not message_id.startswith("<"):
        message_id = f"<{message_id}>"
    _check_header_value("Message-ID", message_id)

    head = [b"From: " + sender.encode()]
    if to:
        head.append(_address_header("To", to))
    if cc:
        head.append(_address_header("Cc", cc))
    if not to and not cc:
        head.append(b"To: undisclosed-recipients:;")
    head.append(_subject_header(subject or ""))
    head.append(b"Date: " + _format_date(date).encode())
    head.append(b"Message-ID: " + message_id.encode())
    head.append(b"MIME-Version: 1.0")

    if text is not None and html is not None:
        parts = [_text_part("plain", text), _text_part("html", html)]
        boundary = _boundary(parts)
        head.append(b'Content-Type: multipart/alternative;\r\n boundary="' + boundary + b'"')
        delimiter = b"--" + boundary
        body = b"".join(delimiter + CRLF + part + CRLF for part in parts) + delimiter + b"--"
        return CRLF.join(head) + CRLF + CRLF + body + CRLF
    if html is not None:
        single = _text_part("html", html)
    else:
        single = _text_part("plain", text or "")
    return CRLF.join(head) + CRLF + single


def _format_date(date: datetime | None) -> str:
    if date is None:
        date = datetime.now(UTC)
    elif date.tzinfo is None:
        date = date.replace(tzinfo=UTC)
    return format_datetime(date)


def _check_header_value(name: str, value: str) -> None:
    if any(ord(ch) < 0x21 or ch == "\x7f" for ch in value):
        raise ValueError(f"{name} holds whitespace or control characters")


def _check_address(address: str) -> None:
    _check_header_value("an address", address)
    if "@" not in address or any(ch in address for ch in ',;<>()"'):
        raise ValueError("an address must be a bare addr-spec (local@domain)")


def _address_header(name: str, addresses: list[str]) -> bytes:
    """``Name: a@x, b@y`` folded before an address when a line would pass 78 characters."""
    lines: list[bytes] = []
    line = name.encode() + b":"
    for index, address in enumerate(addresses):
        item = address.encode() + (b"," if index < len(addresses) - 1 else b"")
        if len(line) + 1 + len(item) > MAX_LINE and index > 0:
            lines.append(line)
            line = b""
        line += b" " + item
    lines.append(line)
    return CRLF.join(lines)


def _subject_header(subject: str) -> bytes:
    if "\r" in subject or "\n" in subject:
        raise ValueError("the subject holds a line break")
    # Plain text only when a reader cannot mistake it: printable ASCII, no "=?" (it would be
    # decoded as an encoded-word), no leading space (dropped by parsers), foldable words.
    plain = (
        set(subject) <= _PLAIN_SUBJECT
        and "=?" not in subject
        and not subject.startswith(" ")
        and max(map(len, subject.split(" ")), default=0) <= 64
    )
    charset = "us-ascii" if plain else "utf-8"  # utf-8: RFC 2047 encoded-words throughout
    folded = Header(subject, charset, header_name="Subject").encode(linesep="\r\n")
    return b"Subject: " + folded.encode("ascii") if folded else b"Subject:"


def _text_part(subtype: str, content: str) -> bytes:
    """Headers and body of one text part; ``text/*`` is put in canonical CRLF form first."""
    lines = content.encode("utf-8").splitlines()  # bytes split on \n, \r and \r\n only
    canonical = CRLF.join(lines) + CRLF if lines else b""
    ascii_ = canonical.isascii()
    if ascii_ and max(map(len, lines), default=0) <= MAX_LINE and b"\0" not in canonical:
        cte, body = "7bit", canonical
    elif ascii_ or 6 * len(canonical.translate(None, _NON_ASCII)) < len(canonical):
        # mostly ASCII: quoted-printable keeps it readable and smaller than base64
        encoded = binascii.b2a_qp(b"\n".join(lines) + b"\n", istext=True) if lines else b""
        cte, body = "quoted-printable", encoded.replace(b"\n", CRLF)
    else:
        cte, body = "base64", base64.encodebytes(canonical).replace(b"\n", CRLF)
    header = (
        f'Content-Type: text/{subtype}; charset="utf-8"\r\nContent-Transfer-Encoding: {cte}\r\n\r\n'
    )
    return header.encode("ascii") + body


def _boundary(parts: list[bytes]) -> bytes:
    """A boundary found in no part ("=_" cannot occur in quoted-printable or base64 text)."""
    while True:
        boundary = b"=_" + uuid.uuid4().hex.encode("ascii")
        if not any(boundary in part for part in parts):
            return boundary
