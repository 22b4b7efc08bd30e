"""The wire form of a richer message (postroom.worker.message): attachments, inline parts,
RFC 2231 file names, Reply-To and custom headers; parsed back with the ``email`` package."""

from __future__ import annotations

import email
import os
from datetime import UTC, datetime
from email.message import EmailMessage
from email.policy import default as default_policy
from typing import Any

import pytest

from postroom.shared.schemas.attachments import Attachment
from postroom.worker.message import build_message

PNG = b"\x89PNG\r\n\x1a\n" + os.urandom(3000)
PDF = b"%PDF-1.4\n" + os.urandom(5000) + b"\r\n\x00end"


def build(**changes: Any) -> bytes:
    args: dict[str, Any] = {
        "sender": "no-reply@example.com", "to": ["alice@example.com"], "cc": [],
        "subject": "Invoice", "text": "See attached.", "html": None,
        "message_id": "<1@example.com>",
    }  # fmt: skip
    args.update(changes)
    return build_message(**args)


def parse(raw: bytes) -> EmailMessage:
    message = email.message_from_bytes(raw, policy=default_policy)
    assert isinstance(message, EmailMessage)
    return message


def test_attachments_wrap_the_body_in_multipart_mixed() -> None:
    """Text, HTML and an attachment: mixed[alternative[plain, html], attachment]; the
    attachment's bytes come back identical, base64 encoded."""
    raw = build(html="<p>See attached.</p>",
                attachments=[Attachment("invoice.pdf", "application/pdf", None, PDF)])
    message = parse(raw)
    assert "multipart/mixed" == message.get_content_type()
    body, attached = message.iter_parts()
    assert "multipart/alternative" == body.get_content_type()
    assert ["text/plain", "text/html"] == [p.get_content_type() for p in body.iter_parts()]
    assert ("application/pdf", "invoice.pdf", "attachment", "base64") == (
        attached.get_content_type(), attached.get_filename(),
        attached.get_content_disposition(), attached["Content-Transfer-Encoding"])
    assert PDF == attached.get_payload(decode=True)
    assert all(len(line) <= 78 for line in raw.split(b"\r\n"))


def test_inline_parts_sit_in_multipart_related_beside_the_html() -> None:
    """An inline image (content_id) goes with the HTML in multipart/related, with its
    Content-ID; with no other attachment there is no multipart/mixed."""
    message = parse(build(html='<img src="cid:logo@acme">',
                          attachments=[Attachment("logo.png", "image/png", "logo@acme", PNG)]))
    assert "multipart/alternative" == message.get_content_type()
    plain, related = message.iter_parts()
    assert "multipart/related" == related.get_content_type()
    html, image = related.iter_parts()
    assert ("text/html", "image/png", "<logo@acme>", "inline") == (
        html.get_content_type(), image.get_content_type(), image["Content-ID"],
        image.get_content_disposition())
    assert PNG == image.get_payload(decode=True)


def test_html_only_with_inline_and_attachment() -> None:
    """HTML alone: mixed[related[html, image], attachment]."""
    message = parse(build(text=None, html='<img src="cid:i">', attachments=[
        Attachment("i.png", "image/png", "i", PNG), Attachment("a.pdf", "application/pdf",
                                                                None, PDF)]))
    related, attached = message.iter_parts()
    assert ["text/html", "image/png"] == [p.get_content_type() for p in related.iter_parts()]
    assert PDF == attached.get_payload(decode=True)


@pytest.mark.parametrize("name", [
    "Rechnung März.pdf",
    "請求書.pdf",
    "a very long name with ümlauts repeated " * 5 + ".pdf",
    'quote " and back\\slash.txt',
    "plain-ascii-but-quite-long-name-that-passes-the-fifty-character-segment.pdf",
])  # fmt: skip
def test_file_names_round_trip(name: str) -> None:
    """Non-ASCII, long and quote-holding names are RFC 2231 parameters (continued when
    long) and parse back to the same name; every line stays within 78 characters."""
    raw = build(attachments=[Attachment(name, "application/pdf", None, b"x")])
    [attached] = parse(raw).iter_attachments()
    assert name == attached.get_filename()
    assert raw.isascii()
    assert all(len(line) <= 78 for line in raw.split(b"\r\n"))


def test_reply_to_and_custom_headers_are_written_as_given() -> None:
    """Reply-To lists the addresses; X- and List-Unsubscribe headers keep their values."""
    headers = {"X-Campaign": "spring-2026", "List-Unsubscribe": "<https://acme.example/u/1>, "
               "<mailto:u@acme.example>", "List-Unsubscribe-Post": "List-Unsubscribe=One-Click"}
    message = parse(build(reply_to=["help@acme.example", "sales@acme.example"],
                          headers=headers))
    assert "help@acme.example, sales@acme.example" == message["Reply-To"]
    for name, value in headers.items():
        assert value == message[name]


@pytest.mark.parametrize("name,value", [("Bcc", "x@example.com"), ("X-A", "v\r\nBcc: x"),
                                        ("X-A", "Grüße")])
def test_a_header_that_slipped_past_intake_is_refused(name: str, value: str) -> None:
    """The builder checks again: no other header names, no line breaks, ASCII only."""
    with pytest.raises(ValueError):
        build(headers={name: value})


def test_a_plain_message_is_unchanged_by_the_new_options() -> None:
    """No attachments, headers or Reply-To: the same bytes as before, apart from the date
    and boundaries (none here)."""
    date = datetime(2026, 1, 1, tzinfo=UTC)
    assert build(date=date) == build(date=date, reply_to=(), headers={}, attachments=())
