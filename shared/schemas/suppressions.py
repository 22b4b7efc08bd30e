"""Suppression list entries and the bounce/complaint events that add them."""

from __future__ import annotations

from typing import Any

from marshmallow import ValidationError
from marshmallow.validate import Length, OneOf

from shared import errors
from shared.schemas.addresses import normalize_address
from shared.schemas.fields import EmailAddress, StrictSchema, Text
from shared.schemas.text import NoControlChars

REASONS = ("manual", "bounce", "complaint")
EVENT_TYPES = ("bounce", "complaint")


class SuppressionSchema(StrictSchema):
    """The optional body of ``PUT …/suppressions/{email}``."""

    reason = Text(
        load_default="manual",
        validate=OneOf(REASONS, error='Must be "manual", "bounce" or "complaint".'),
    )


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


def email_param(value: str, *, check_dns: bool = False) -> str:
    """A path's ``{email}``, normalized; a 400 naming ``email`` when it is not valid."""
    try:
        return normalize_address(value, check_dns=check_dns)
    except ValidationError as error:
        messages = [str(m) for m in error.messages] if isinstance(error.messages, list) else []
        raise errors.ValidationError("invalid fields: email", fields={"email": messages}) from None
