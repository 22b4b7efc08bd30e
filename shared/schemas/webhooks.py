"""The bodies of ``POST /solutions/{sid}/webhooks`` and ``PATCH …/webhooks/{id}``."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

from marshmallow import ValidationError, fields, validates
from marshmallow.validate import Length, OneOf

from postroom.shared.events import ALL, EVENT_TYPES
from postroom.shared.schemas.fields import NULL, REQUIRED, StrictSchema, Text
from postroom.shared.schemas.validators import NoControlChars

URL_MAX = 2048
DESCRIPTION_MAX = 256
URL_RULE = (
    "Must be an absolute http:// or https:// URL with a host, without user or password, "
    f"in ASCII (a name in its xn-- form, a path percent-encoded), at most {URL_MAX} characters."
)


#: the URL's whole shape: printable ASCII (a name in its xn-- form, a path
#: percent-encoded), no user or password (no "@" before the path)
URL_PATTERN = r"^[Hh][Tt][Tt][Pp][Ss]?://[A-Za-z0-9._~\-\[\]:]+(?:[/?#][!-~]*)?$"
_URL = re.compile(URL_PATTERN)


class WebhookUrl(Text):
    """An absolute ``http``/``https`` URL with a host and no credentials, in ASCII."""

    json_schema: dict[str, Any] = {"format": "uri", "pattern": URL_PATTERN, "maxLength": URL_MAX}

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        text = super()._deserialize(value, attr, data, **kwargs)
        if len(text) > URL_MAX or not _URL.fullmatch(text):
            raise ValidationError(URL_RULE)
        try:
            parts = urlsplit(text)
            port = parts.port
        except ValueError:
            raise ValidationError(URL_RULE) from None
        if (parts.scheme.lower() not in ("http", "https") or not parts.hostname
                or "@" in parts.netloc or port == 0):  # fmt: skip
            raise ValidationError(URL_RULE)
        return text


class EventList(fields.List):
    default_error_messages = {
        "invalid": "Must be a list of event types.",
        "null": NULL,
        "required": REQUIRED,
    }

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(
            Text(validate=OneOf((ALL, *EVENT_TYPES),
                                error=f"Must be one of {', '.join((ALL, *EVENT_TYPES))}.")),
            validate=Length(min=1, max=len(EVENT_TYPES) + 1,
                            error="Must list 1 to {max} event types."),
            metadata={**kwargs.pop("metadata", {}), "json_schema": {"uniqueItems": True}},
            **kwargs,
        )  # fmt: skip


class JsonBoolean(fields.Boolean):
    """A JSON boolean: ``"true"``, ``1`` and ``"yes"`` are refused."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> bool:
        if not isinstance(value, bool):
            raise self.make_error("invalid", input=value)
        return value


def _events_rule(value: list[str]) -> None:
    if len(set(value)) != len(value):
        raise ValidationError("Each event type at most once.")


class WebhookCreateSchema(StrictSchema):
    url = WebhookUrl(required=True, metadata={
        "description": "Where events are POSTed: http or https; the host must resolve to a "
        "public address unless listed in POSTROOM_WEBHOOK_ALLOW_HOSTS."})  # fmt: skip
    events = EventList(required=True, metadata={
        "description": 'The event types to send, or ["*"] for all.'})  # fmt: skip
    description = Text(
        allow_none=True,
        load_default=None,
        validate=[NoControlChars(), Length(max=DESCRIPTION_MAX, error="At most {max} characters.")],
    )

    @validates("events")
    def _unique(self, value: list[str], **_: Any) -> None:
        _events_rule(value)


class WebhookPatchSchema(StrictSchema):
    url = WebhookUrl()
    events = EventList()
    description = Text(
        allow_none=True,
        validate=[NoControlChars(), Length(max=DESCRIPTION_MAX, error="At most {max} characters.")],
    )
    enabled = JsonBoolean(
        error_messages={"invalid": "Must be true or false.", "null": NULL},
        metadata={"description": "false stops deliveries (events are not queued meanwhile); "
                  "true starts them again and clears an automatic disabling."},
    )

    @validates("events")
    def _unique(self, value: list[str], **_: Any) -> None:
        _events_rule(value)
