"""The wire form of a message (postroom.worker.message) and the identifiers it carries
(postroom.shared.ids)."""

from __future__ import annotations

import email
import re
from datetime import UTC, datetime
from email.message import EmailMessage, MIMEPart
from email.policy import default as default_policy
from typing import Any

import pytest

from postroom.shared.ids import make_message_id, sender_domain
from postroom.worker.message import build_message

MESSAGE_ID = "<0123456789abcdef@example.com>"


def build(**changes: Any) -> bytes:
    args: dict[str, Any] = {
        "sender": "no-reply@example.com",
        "to": ["alice@example.com"],
        "cc": [],
        "subject": "Hello",
        "text": "Hi Alice",
        "html": None,
        "message_id": MESSAGE_ID,
    }
    args.update(changes)
    return build_message(**args)


def parse(raw: bytes) -> EmailMessage:
    message = email.message_from_bytes(raw, policy=default_policy)
    assert isinstance(message, EmailMessage)
    return message


def header_block(raw: bytes) -> bytes:
    return raw.split(b"\r\n\r\n", 1)[0]


def content(part: MIMEPart) -> str:
    text = part.get_content()
    assert isinstance(text, str)
    return text.replace("\r\n", "\n")


def test_text_and_html_make_multipart_alternative() -> None:
    """Text and HTML together give multipart/alternative: text/plain first, then text/html."""
    message = parse(build(text="plain body", html="<p>html body</p>"))

    assert message.get_content_type() == "multipart/alternative"
    parts = list(message.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "text/html"]
    assert [content(p) for p in parts] == ["plain body\n", "<p>html body</p>\n"]
    assert all(p.get_content_charset() == "utf-8" for p in parts)


@pytest.mark.parametrize(
    ("text", "html", "content_type", "expected"),
    [
        ("only text", None, "text/plain", "only text\n"),
        (None, "<b>only html</b>", "text/html", "<b>only html</b>\n"),
        (None, None, "text/plain", ""),
    ],
)
def test_single_part(text: str | None, html: str | None, content_type: str, expected: str) -> None:
    """One body gives a single part of its type; no body at all gives an empty text/plain."""
    message = parse(build(text=text, html=html))

    assert not message.is_multipart()
    assert message.get_content_type() == content_type
    assert content(message) == expected


def test_headers() -> None:
    """From, To, Subject, Date, Message-ID (with angle brackets) and MIME-Version are set."""
    date = datetime(2024, 5, 17, 8, 30, tzinfo=UTC)
    message = parse(build(to=["a@example.com", "b@example.org"], date=date))

    assert message["From"] == "no-reply@example.com"
    assert message["To"] == "a@example.com, b@example.org"
    assert message["Subject"] == "Hello"
    assert message["Date"] == "Fri, 17 May 2024 08:30:00 +0000"
    assert message["Message-ID"] == MESSAGE_ID
    assert message["MIME-Version"] == "1.0"
    assert message["Cc"] is None


def test_cc_header_only_with_cc() -> None:
    """A Cc header appears exactly when there are cc recipients."""
    message = parse(build(cc=["carol@example.com", "dave@example.com"]))

    assert message["Cc"] == "carol@example.com, dave@example.com"


def test_no_bcc_header_ever() -> None:
    """Bcc is never a header, not even through a subject that hides one in an encoded-word
    (``email.message.EmailMessage`` decodes that into a real ``Bcc:`` line)."""
    subject = "=?UTF-8?Q?=0D=0A?=Bcc: spy@example.com"
    raw = build(subject=subject)

    assert re.search(rb"^bcc:", raw, re.IGNORECASE | re.MULTILINE) is None
    message = parse(raw)
    assert message["Bcc"] is None
    assert message["Subject"] == subject


def test_crlf_line_endings_only() -> None:
    """Every line ends in CRLF, whatever line endings the bodies came with."""
    raw = build(text="one\ntwo\r\nthree\rfour", html="<p>a</p>\n<p>b</p>")

    assert raw.endswith(b"\r\n")
    assert b"\n" not in raw.replace(b"\r\n", b"")
    assert b"\r" not in raw.replace(b"\r\n", b"")


@pytest.mark.parametrize(
    "subject",
    [
        "Grüße aus Köln ☃",
        "  leading and  double  spaces",
        "Ünïcödé " * 40,
        "x" * 300,
        "word " * 60,
        "",
    ],
)
def test_subject_round_trips(subject: str) -> None:
    """A subject, non-ASCII or long, reads back unchanged through the email parser; the header
    bytes stay ASCII and no line passes 78 characters."""
    raw = build(subject=subject)

    assert parse(raw)["Subject"] == subject
    head = header_block(raw)
    assert head.isascii()
    assert max(len(line) for line in head.split(b"\r\n")) <= 78


def test_utf8_bodies_are_encoded_and_round_trip() -> None:
    """Non-ASCII bodies are sent 7-bit clean (quoted-printable or base64) in UTF-8 and read
    back unchanged; long lines are wrapped by the transfer encoding."""
    text = "Grüße, " + "lange Zeile " * 40 + "\nzweite Zeile\n"
    html = "<p>" + "日本語のテキスト" * 30 + "</p>"
    raw = build(text=text, html=html)

    assert raw.isascii()
    assert max(len(line) for line in raw.split(b"\r\n")) <= 78
    plain, rich = parse(raw).iter_parts()
    assert plain["Content-Transfer-Encoding"] == "quoted-printable"
    assert rich["Content-Transfer-Encoding"] == "base64"
    assert content(plain) == text
    assert content(rich) == html + "\n"


def test_short_ascii_body_is_sent_as_is() -> None:
    """A short ASCII body needs no transfer encoding; a dot at a line start is left to SMTP."""
    raw = build(text="line one\n.\nline three")

    message = parse(raw)
    assert message["Content-Transfer-Encoding"] == "7bit"
    assert raw.endswith(b"\r\n\r\nline one\r\n.\r\nline three\r\n")


def test_message_id_gets_angle_brackets() -> None:
    """A Message-ID given without angle brackets is written with them."""
    message = parse(build(message_id="abc@example.com"))

    assert message["Message-ID"] == "<abc@example.com>"


@pytest.mark.parametrize(
    "changes",
    [
        {"sender": "evil@example.com\r\nBcc: spy@example.com"},
        {"to": ["a@example.com\nBcc: spy@example.com"]},
        {"cc": ["Name <a@example.com>"]},
        {"message_id": "<a@example.com>\r\nBcc: spy@example.com"},
        {"subject": "hello\r\nBcc: spy@example.com"},
    ],
)
def test_header_injection_is_refused(changes: dict[str, Any]) -> None:
    """Line breaks in an address, the Message-ID or the subject raise instead of adding
    headers; addresses must be bare."""
    with pytest.raises(ValueError):
        build(**changes)


def test_make_message_id() -> None:
    """A Message-ID is <32 hex digits@domain>, different every time, with no host lookup."""
    first, second = make_message_id("example.com"), make_message_id("example.com")

    assert re.fullmatch(r"<[0-9a-f]{32}@example\.com>", first)
    assert first != second


def test_make_message_id_idna_domain() -> None:
    """A non-ASCII domain is written in its IDNA form so the header stays ASCII."""
    assert make_message_id("bücher.example").endswith("@xn--bcher-kva.example>")


def test_sender_domain() -> None:
    """The domain is what follows the last @, lower-cased; no @ is an error."""
    assert sender_domain("No-Reply@Mail.Example.COM") == "mail.example.com"
    with pytest.raises(ValueError):
        sender_domain("no-domain")
