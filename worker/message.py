"""The wire bytes of one message: headers and MIME body, CRLF line endings, UTF-8 throughout.

The message is written directly rather than through ``email.message.EmailMessage``: that
class is many times slower (``docs/throughput.md``), and it decodes RFC 2047 encoded-words
in a subject and folds the decoded text back out, so ``=?UTF-8?Q?=0D=0A?=Bcc: x`` would
become a real header.
Here a subject that is not plain printable ASCII is always written as encoded-words, and the
output is checked by the ``email`` parser in the tests. Bcc is an envelope matter only: it is
never a parameter here, so it can never reach the headers.
"""

from __future__ import annotations

import base64
import binascii
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from email.header import Header
from email.utils import format_datetime
from urllib.parse import quote

import redis

from postroom.shared import attachments as stored
from postroom.shared.records import Job
from postroom.shared.schemas.attachments import Attachment

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
    reply_to: Sequence[str] = (),
    headers: Mapping[str, str] | None = None,
    attachments: Sequence[Attachment] = (),
) -> bytes:
    """The message as bytes ready for SMTP ``DATA`` (CRLF line endings, 7-bit clean unless an
    address is non-ASCII, which only an SMTPUTF8 relay is then asked to carry).

    With attachments the body is ``multipart/mixed`` around the text part(s); inline ones
    (with a Content-ID) sit in a ``multipart/related`` beside the HTML they illustrate::

        mixed ─┬─ alternative ─┬─ text/plain
               │               └─ related ─┬─ text/html
               │                           └─ inline image …
               └─ attachment …
    """
    for address in (sender, *to, *cc, *reply_to):
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
    if reply_to:
        head.append(_address_header("Reply-To", list(reply_to)))
    for name, value in (headers or {}).items():
        head.append(_custom_header(name, value))
    head.append(b"MIME-Version: 1.0")

    if attachments:
        return CRLF.join(head) + CRLF + _with_attachments(text, html, attachments)
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


def attachments_of(client: redis.Redis, job: Job) -> list[Attachment]:
    """A job's attachments, their bytes read from postroom's Redis."""
    metas = job.get("attachments") or []
    if not metas:
        return []
    contents = stored.load(client, job["solution_id"], job["task_id"], metas)
    return [Attachment(m["filename"], m["content_type"], m.get("content_id"), content)
            for m, content in zip(metas, contents, strict=True)]  # fmt: skip


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


def _custom_header(name: str, value: str) -> bytes:
    """A caller's header (checked at intake; checked again here: printable ASCII only)."""
    if not name.startswith(("X-", "List-Unsubscribe")) or not all(
        0x21 <= ord(ch) <= 0x7E and ch != ":" for ch in name
    ):
        raise ValueError("a custom header name must be X-… or List-Unsubscribe(-Post)")
    if not all(0x20 <= ord(ch) <= 0x7E for ch in value):
        raise ValueError(f"the {name} header holds other than printable ASCII")
    return f"{name}: {value}".encode("ascii")


def _multipart(subtype: str, parts: list[bytes], extra: str = "") -> bytes:
    """A ``multipart/<subtype>`` entity (its Content-Type header, a blank line, the parts)."""
    boundary = _boundary(parts)
    delimiter = b"--" + boundary
    body = b"".join(delimiter + CRLF + part + CRLF for part in parts) + delimiter + b"--" + CRLF
    header = f'Content-Type: multipart/{subtype};{extra}\r\n boundary="'.encode() + boundary
    return header + b'"' + CRLF + CRLF + body


def _with_attachments(text: str | None, html: str | None,
                      attachments: Sequence[Attachment]) -> bytes:  # fmt: skip
    """The body entity of a message with attachments (see :func:`build_message`)."""
    inline = [a for a in attachments if a.content_id is not None]
    regular = [a for a in attachments if a.content_id is None]
    html_part = _text_part("html", html) if html is not None else None
    if html_part is not None and inline:
        html_part = _multipart("related", [html_part, *map(_attachment_part, inline)],
                               ' type="text/html";')  # fmt: skip
    if text is not None and html_part is not None:
        body = _multipart("alternative", [_text_part("plain", text), html_part])
    elif html_part is not None:
        body = html_part
    else:
        body = _text_part("plain", text or "")
    if not regular:
        return body
    return _multipart("mixed", [body, *map(_attachment_part, regular)])


def _attachment_part(item: Attachment) -> bytes:
    """One attachment, base64 in lines of 76; an inline one with its Content-ID. Names
    that are not plain ASCII are written as RFC 2231 parameters (``filename*=utf-8''…``),
    in continuations when long."""
    disposition = "inline" if item.content_id is not None else "attachment"
    lines = [
        f"Content-Type: {item.content_type};" + _parameter("name", item.filename),
        f"Content-Disposition: {disposition};" + _parameter("filename", item.filename),
        "Content-Transfer-Encoding: base64",
    ]
    if item.content_id is not None:
        lines.append(f"Content-ID: <{item.content_id}>")
    encoded = base64.encodebytes(item.content).replace(b"\n", CRLF)
    return "\r\n".join(lines).encode("ascii") + CRLF + CRLF + encoded


_QUOTABLE = frozenset(map(chr, range(0x20, 0x7F))) - {'"', "\\"}
_SEGMENT = 50  # characters of a parameter's value per line


def _parameter(name: str, value: str) -> str:
    """`` name="value"`` on a folded line, or RFC 2231 ``name*0*=utf-8''…`` segments."""
    if set(value) <= _QUOTABLE and len(value) <= _SEGMENT:
        return f'\r\n {name}="{value}"'
    encoded = quote(value, safe="!#$&+-.^_`|~")
    if len(encoded) <= _SEGMENT:
        return f"\r\n {name}*=utf-8''{encoded}"
    segments, start = [], 0
    while start < len(encoded):
        end = min(start + _SEGMENT, len(encoded))
        while "%" in encoded[end - 2 : end] and end < len(encoded):  # never split a %XX
            end -= 1
        segments.append(encoded[start:end])
        start = end
    first = f"\r\n {name}*0*=utf-8''{segments[0]}"
    rest = "".join(f";\r\n {name}*{n}*={seg}" for n, seg in enumerate(segments[1:], 1))
    return first + rest


def _boundary(parts: list[bytes]) -> bytes:
    """A boundary found in no part ("=_" cannot occur in quoted-printable or base64 text)."""
    while True:
        boundary = b"=_" + uuid.uuid4().hex.encode("ascii")
        if not any(boundary in part for part in parts):
            return boundary
