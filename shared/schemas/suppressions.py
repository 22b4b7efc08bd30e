"""Suppression list entries and the bounce/complaint events that add them."""

from __future__ import annotations

import time
from typing import Any, ClassVar

from marshmallow import ValidationError, fields, post_load, validates_schema
from marshmallow.validate import Length, OneOf, Range

from postroom.shared import errors
from postroom.shared.schemas.addresses import normalize_address
from postroom.shared.schemas.fields import NULL, EmailAddress, JsonInteger, StrictSchema, Text
from postroom.shared.schemas.validators import NoControlChars

REASONS = ("manual", "bounce", "complaint")
EVENT_TYPES = ("bounce", "complaint")
MAX_TTL_S = 100 * 365 * 86400  # far enough to mean "for good"; omit both for never


class Rfc3339(fields.AwareDateTime):
    """An RFC 3339 date-time with a time zone (``2030-01-31T12:00:00Z``)."""

    json_schema: dict[str, Any] = {"type": "string", "format": "date-time"}
    default_error_messages = {
        "invalid": "Must be an RFC 3339 date-time, e.g. 2030-01-31T12:00:00Z.",
        "invalid_awareness": "Must have a time zone (Z or +hh:mm).",
        "null": NULL,
    }

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(format="iso", **kwargs)


class SuppressionSchema(StrictSchema):
    """The optional body of ``PUT …/suppressions/{email}``: the reason, and when the
    suppression ends (``expires_at`` or ``ttl_s``; neither: never).

    Loaded: ``{reason, expires_at}``, ``expires_at`` in epoch seconds and present only
    when one was given."""

    # For the published JSON Schema: not both expires_at and ttl_s.
    json_schema: ClassVar[dict[str, Any]] = {
        "anyOf": [{"properties": {name: {"type": "null"}}} for name in ("expires_at", "ttl_s")]
    }

    reason = Text(
        load_default="manual",
        validate=OneOf(REASONS, error='Must be "manual", "bounce" or "complaint".'),
    )
    expires_at = Rfc3339(
        allow_none=True,
        metadata={"description": "When the suppression ends (RFC 3339); none: never."},
    )
    ttl_s = JsonInteger(
        allow_none=True,
        validate=Range(1, MAX_TTL_S, error="Must be between {min} and {max}."),
        metadata={"description": "Seconds until the suppression ends (instead of expires_at)."},
    )

    @validates_schema
    def _one_expiry(self, data: dict[str, Any], **_: Any) -> None:
        if data.get("expires_at") is not None and data.get("ttl_s") is not None:
            raise ValidationError("Give expires_at or ttl_s, not both.", "ttl_s")
        expires = data.get("expires_at")
        if expires is not None:
            ahead = expires.timestamp() - time.time()
            if ahead <= 0:
                raise ValidationError("Must be in the future.", "expires_at")
            if ahead > MAX_TTL_S:
                raise ValidationError("Must be at most 100 years ahead.", "expires_at")

    @post_load
    def _expiry(self, data: dict[str, Any], **_: Any) -> dict[str, Any]:
        loaded: dict[str, Any] = {"reason": data["reason"]}
        if data.get("ttl_s") is not None:
            loaded["expires_at"] = time.time() + data["ttl_s"]
        elif data.get("expires_at") is not None:
            loaded["expires_at"] = data["expires_at"].timestamp()
        return loaded


class EventSchema(StrictSchema):
    """``POST …/events``: a bounce or a complaint reported for an address."""

    type = Text(
        required=True,
        validate=OneOf(EVENT_TYPES, error='Must be "bounce" or "complaint".'),
    )
    email = EmailAddress(required=True)
    detail = Text(
        allow_none=True,
        load_default=None,
        validate=[NoControlChars(body=True), Length(max=2000, error="At most {max} characters.")],
        metadata={"description": "Free text, e.g. the remote server's diagnostic."},
    )

    def __init__(self, *, check_dns: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.check_dns = check_dns


def email_param(value: str, *, check_dns: bool = False, field: str = "email") -> str:
    """A path's ``{email}`` (or the parameter ``field``), normalized; a 400 naming it when
    it is not valid."""
    try:
        return normalize_address(value, check_dns=check_dns)
    except ValidationError as error:
        messages = [str(m) for m in error.messages] if isinstance(error.messages, list) else []
        raise errors.ValidationError(f"invalid fields: {field}", fields={field: messages}) from None
