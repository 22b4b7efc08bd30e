"""The field types of postroom's request schemas, with user-facing messages.

Every field says what JSON it takes. ``json_schema`` on a field class or a validator is
what :mod:`postroom.shared.schemas.json_schema` adds to the generated schema for it.
"""

from __future__ import annotations

from typing import Any

from marshmallow import Schema, fields

from postroom.shared.schemas.addresses import normalize_address

NULL = "May not be null."
REQUIRED = "This field is required."


class StrictSchema(Schema):
    """Unknown fields are an error at every level; messages read well in an API reply."""

    class Meta:
        unknown = "raise"

    error_messages = {"unknown": "Unknown field.", "type": "Must be a JSON object."}


class Text(fields.String):
    """A JSON string."""

    default_error_messages = {
        "invalid": "Must be a string.",
        "null": NULL,
        "required": REQUIRED,
    }


class JsonInteger(fields.Integer):
    """A JSON integer: ``"10"``, ``10.5`` and ``true`` are refused. ``10.0`` is taken as
    ``10``: JSON has one number type, JSON Schema calls a number with a zero fractional
    part an integer, and JavaScript and many encoders cannot tell ``10.0`` from ``10``."""

    default_error_messages = {
        "invalid": "Must be a JSON integer.",
        "too_large": "Number too large.",
        "null": NULL,
        "required": REQUIRED,
    }

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(strict=True, **kwargs)

    def _validated(self, value: Any) -> int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        return super()._validated(value)


class EmailAddress(Text):
    """A bare email address, returned normalized (see :mod:`postroom.shared.schemas.addresses`).

    DNS checks follow the root schema's ``check_dns`` attribute (off by default)."""

    # the local part is ASCII (no SMTPUTF8); the domain may be internationalized
    json_schema: dict[str, Any] = {"format": "email", "maxLength": 254,
                                   "pattern": "^[\\u0021-\\u007e]+@"}  # fmt: skip

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        text = super()._deserialize(value, attr, data, **kwargs)
        return normalize_address(text, check_dns=bool(getattr(self.root, "check_dns", False)))


class AddressList(fields.List):
    """A JSON array of email addresses."""

    default_error_messages = {
        "invalid": "Must be a list of email addresses.",
        "null": NULL,
        "required": REQUIRED,
    }

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(EmailAddress(), **kwargs)


class Object(fields.Nested):
    """A nested JSON object."""

    default_error_messages = {"null": NULL, "required": REQUIRED}


#: the limits of a send's ``metadata``
METADATA_MAX_KEYS = 10
METADATA_KEY_MAX = 40
METADATA_VALUE_MAX = 256


class Metadata(fields.Field):
    """A send's ``metadata``: an object of at most 10 string keys (1–40 characters) to
    string values (at most 256 characters), kept in the task document and its events."""

    json_schema: dict[str, Any] = {
        "type": "object",
        "maxProperties": METADATA_MAX_KEYS,
        "propertyNames": {"minLength": 1, "maxLength": METADATA_KEY_MAX},
        "additionalProperties": {"type": "string", "maxLength": METADATA_VALUE_MAX},
    }
    default_error_messages = {
        "invalid": (
            f"Must be an object of at most {METADATA_MAX_KEYS} keys of 1 to "
            f"{METADATA_KEY_MAX} characters, each to a string of at most "
            f"{METADATA_VALUE_MAX} characters."
        ),
        "null": NULL,
        "required": REQUIRED,
    }

    def _deserialize(self, value: Any, attr: str | None, data: Any,
                     **kwargs: Any) -> dict[str, str]:  # fmt: skip
        if (
            not isinstance(value, dict)
            or len(value) > METADATA_MAX_KEYS
            or not all(
                isinstance(k, str) and 1 <= len(k) <= METADATA_KEY_MAX
                and isinstance(v, str) and len(v) <= METADATA_VALUE_MAX
                for k, v in value.items()
            )
        ):
            raise self.make_error("invalid")
        return dict(value)
