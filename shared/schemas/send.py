"""The body of ``POST /solutions/{sid}/email`` (the platform's ``Email.send`` parameters).

A loaded request holds every key, under its JSON name::

    {"to": [str], "cc": [str], "bcc": [str],        # normalized addresses, maybe empty
     "from": str | None, "subject": str | None, "text": str | None, "html": str | None,
     "hLimit": int | None,
     "connection": {"server": str, "port": int, "user": str | None,
                    "password": str | None, "scheme": "smtp" | "smtps" | ""} | None,
     "reply_to": [str], "headers": {str: str}, "attachments": [Attachment],
     "template": str | None, "template_data": dict, "send_at": float | None,
     "metadata": {str: str}}                        # empty when none was given

(reply_to … send_at: :mod:`postroom.shared.schemas.headers`, ``.attachments``, ``.templates``,
``.send_at``)

``null`` is read as an absent field. ``connection.port`` defaults by scheme (587, 465, 25).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from marshmallow import ValidationError, post_load, pre_load, validates_schema
from marshmallow.validate import Length, OneOf, Range

from postroom.shared import errors
from postroom.shared.relays import SCHEMES, configured_relay, relay_port
from postroom.shared.schemas.attachments import AttachmentList, check_attachment_size, check_inline
from postroom.shared.schemas.fields import (
    AddressList,
    EmailAddress,
    JsonInteger,
    Metadata,
    Object,
    StrictSchema,
    Text,
)
from postroom.shared.schemas.headers import MAX_REPLY_TO, HeadersField
from postroom.shared.schemas.send_at import SendAt
from postroom.shared.schemas.templates import TemplateData, template_name_field
from postroom.shared.schemas.validators import (
    HostName,
    NoControlChars,
    NoEncodedWords,
    NoWhitespace,
)

if TYPE_CHECKING:
    from postroom.shared.settings import Settings

RECIPIENT_FIELDS = ("to", "cc", "bcc")
SUBJECT_MAX = 998  # RFC 5322's line limit
HLIMIT_MAX = 1_000_000_000  # far above any real need; keeps the Lua arithmetic exact
SCHEME_ERROR = 'Must be one of "smtp" (STARTTLS), "smtps" (implicit TLS) or "" (plain text).'


def port_field(**kwargs: Any) -> JsonInteger:
    return JsonInteger(validate=Range(1, 65535, error="Must be between 1 and 65535."), **kwargs)


def scheme_field(**kwargs: Any) -> Text:
    return Text(validate=OneOf(SCHEMES, error=SCHEME_ERROR), **kwargs)


def hlimit_field(**kwargs: Any) -> JsonInteger:
    return JsonInteger(
        validate=Range(0, HLIMIT_MAX, error="Must be between {min} and {max}."), **kwargs
    )


def user_field(**kwargs: Any) -> Text:
    return Text(validate=[NoControlChars(), NoWhitespace(), Length(max=320)], **kwargs)


def password_field(**kwargs: Any) -> Text:
    return Text(validate=[NoControlChars(), Length(max=1024)], **kwargs)


class ConnectionSchema(StrictSchema):
    """The caller's own SMTP relay for this message."""

    server = Text(
        required=True,
        validate=[NoControlChars(), HostName()],
        metadata={"description": "Host name or IP address of the relay."},
    )
    port = port_field(
        allow_none=True,
        metadata={"description": "Defaults to 587 for smtp, 465 for smtps, 25 for plain."},
    )
    user = user_field(allow_none=True)
    password = password_field(allow_none=True)
    scheme = scheme_field(allow_none=True, load_default="smtp")

    @post_load
    def _defaults(self, data: dict[str, Any], **_: Any) -> dict[str, Any]:
        scheme = data.get("scheme")
        scheme = "smtp" if scheme is None else scheme
        port = data.get("port")
        return {
            "server": data["server"].lower(),
            "port": relay_port(port, scheme),
            "user": data.get("user"),
            "password": data.get("password"),
            "scheme": scheme,
        }


class SendRequestSchema(StrictSchema):
    """Validates and normalizes a send request; build it once with :func:`make_send_schema`."""

    # For the published JSON Schema: at least one recipient in to, cc or bcc; a template
    # replaces subject, text and html; template_data only with a template.
    json_schema: ClassVar[dict[str, Any]] = {
        "anyOf": [
            {"required": [name], "properties": {name: {"type": "array", "minItems": 1}}}
            for name in RECIPIENT_FIELDS
        ],
        "allOf": [
            {"anyOf": [
                {"properties": {"template": {"type": "null"}}},
                {"properties": {part: {"type": "null"} for part in ("subject", "text", "html")}},
            ]},
            {"anyOf": [
                {"required": ["template"], "properties": {"template": {"type": "string"}}},
                {"properties": {"template_data": {"type": "null"}}},
            ]},
        ],
    }  # fmt: skip

    to = AddressList(allow_none=True)
    cc = AddressList(allow_none=True)
    bcc = AddressList(allow_none=True)
    from_ = EmailAddress(data_key="from", attribute="from", allow_none=True)
    subject = Text(
        allow_none=True,
        validate=[
            NoControlChars(),
            NoEncodedWords(),
            Length(max=SUBJECT_MAX, error="At most {max} characters."),
        ],
    )
    text = Text(allow_none=True, validate=NoControlChars(body=True))
    html = Text(allow_none=True, validate=NoControlChars(body=True))
    hlimit = hlimit_field(
        data_key="hLimit",
        attribute="hLimit",
        allow_none=True,
        metadata={"description": "A tighter hourly limit for this message (a second bucket)."},
    )
    connection = Object(ConnectionSchema, allow_none=True)
    # -- reply_to, headers, attachments, templates, send_at --
    reply_to = AddressList(
        allow_none=True,
        validate=Length(max=MAX_REPLY_TO, error=f"At most {MAX_REPLY_TO} addresses."),
    )
    headers = HeadersField(allow_none=True)
    attachments = AttachmentList(allow_none=True)
    template = template_name_field(allow_none=True, metadata={
        "description": "A stored template rendered with template_data, instead of "
        "subject, text and html."})  # fmt: skip
    template_data = TemplateData(allow_none=True)
    send_at = SendAt(allow_none=True, metadata={
        "description": "RFC 3339 with an offset, at most 30 days ahead; the task is "
        "scheduled until then (a time past is now)."})  # fmt: skip
    metadata = Metadata(
        allow_none=True,
        metadata={"description": "Your own string keys and values, kept in the task "
                  "document and in every delivery event of the message."},
    )

    def __init__(
        self,
        *,
        max_recipients: int = 50,
        check_dns: bool = False,
        max_attachment_bytes: int = 7 * 1024 * 1024,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.max_recipients = max_recipients
        self.max_attachment_bytes = max_attachment_bytes
        self.check_dns = check_dns  # read by the EmailAddress fields
        for name in RECIPIENT_FIELDS:  # fields are per instance: the limit is this one's
            field = self.fields[name]
            field.metadata = {**field.metadata, "json_schema": {"maxItems": max_recipients}}
        self.fields["to"].metadata = {
            **self.fields["to"].metadata,
            "description": f"At least one recipient and at most {max_recipients} in to, cc "
            "and bcc together.",
        }

    @property
    def too_many(self) -> str:
        return f"At most {self.max_recipients} recipients in to, cc and bcc together."

    @pre_load
    def _count_recipients(self, data: Any, **_: Any) -> Any:
        """Refuse an oversized list before validating thousands of addresses. The error
        names the field in which the running count (to, then cc, then bcc) passes the limit."""
        if not isinstance(data, Mapping):
            return data
        total = 0
        for name in RECIPIENT_FIELDS:
            value = data.get(name)
            if isinstance(value, list):
                total += len(value)
                if total > self.max_recipients:
                    raise ValidationError(self.too_many, name)
        return data

    @validates_schema(pass_original=True, skip_on_field_errors=False)
    def _require_recipient(self, data: dict[str, Any], original_data: Any, **_: Any) -> None:
        if any(data.get(name) for name in RECIPIENT_FIELDS):
            return
        if not isinstance(original_data, Mapping):
            return  # the body is not an object: that is the error
        if any(original_data.get(name) not in (None, []) for name in RECIPIENT_FIELDS):
            return  # a recipient field was given but is invalid: it has its own error
        raise ValidationError("At least one recipient is required in to, cc or bcc.", "to")

    @validates_schema(skip_on_field_errors=True)
    def _templates_and_inline_parts(self, data: dict[str, Any], **_: Any) -> None:
        """A template replaces subject, text and html; inline parts are referenced."""
        if data.get("template") is not None:
            given = [n for n in ("subject", "text", "html") if data.get(n) is not None]
            if given:
                raise ValidationError(
                    f"A template replaces subject, text and html (given: {', '.join(given)}).",
                    "template",
                )
        elif data.get("template_data") is not None:
            raise ValidationError("Given without a template.", "template_data")
        attachments = data.get("attachments") or []
        check_attachment_size(attachments, self.max_attachment_bytes)
        if data.get("template") is None:  # else checked once rendered
            check_inline(attachments, data.get("html"))

    @post_load
    def _complete(self, data: dict[str, Any], **_: Any) -> dict[str, Any]:
        loaded: dict[str, Any] = {name: data.get(name) or [] for name in RECIPIENT_FIELDS}
        for name in ("from", "subject", "text", "html", "hLimit", "connection"):
            loaded[name] = data.get(name)
        loaded["reply_to"] = data.get("reply_to") or []
        loaded["headers"] = data.get("headers") or {}
        loaded["attachments"] = data.get("attachments") or []
        loaded["template"] = data.get("template")
        loaded["template_data"] = data.get("template_data") or {}
        loaded["send_at"] = data.get("send_at")
        loaded["metadata"] = data.get("metadata") or {}
        return loaded


def make_send_schema(settings: Settings) -> SendRequestSchema:
    """The send schema for ``settings`` (``max_recipients``, ``check_dns``); build it once."""
    return SendRequestSchema(max_recipients=settings.max_recipients, check_dns=settings.check_dns,
                             max_attachment_bytes=settings.max_attachment_bytes)


def check_sender(data: Mapping[str, Any], solution_config: Mapping[str, Any]) -> None:
    """``from`` is allowed only on the caller's own relay: ``connection`` in the request or
    ``connection_server`` in the solution's configuration. Raises the 400 otherwise."""
    if data.get("from") is None:
        return
    if data.get("connection") or configured_relay(solution_config) is not None:
        return
    raise errors.ValidationError(
        "invalid fields: from",
        fields={
            "from": [
                "A sender may be set only when the message goes through your own relay: "
                "give a connection, or set connection_server in the solution's configuration."
            ]
        },
    )
