"""A solution's configuration: ``POST /solutions``, ``PUT`` and ``PATCH …/config``.

Loaded configurations use the JSON names (``hLimit``, ``hLimit_policy``). ``null`` puts a
field back to its default. PUT (and create) return every field, omitted ones at their
defaults; PATCH returns only the fields given, to be merged into the stored ones.
``connection_port`` ``None`` means the scheme's default port
(``postroom.shared.relays.relay_port``):
a stored number would go stale when the scheme changes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from marshmallow import post_load
from marshmallow.validate import OneOf

from postroom.shared.schemas.fields import StrictSchema, Text
from postroom.shared.schemas.send import (
    hlimit_field,
    password_field,
    port_field,
    scheme_field,
    user_field,
)
from postroom.shared.schemas.validators import FullMatch, HostName, NoControlChars
from postroom.shared.solutions import config_defaults

if TYPE_CHECKING:
    from postroom.shared.settings import Settings

POLICIES = ("reject", "defer")
SOLUTION_ID = r"[a-z0-9][a-z0-9_-]{0,62}"


class SolutionConfigSchema(StrictSchema):
    """Full (``partial=False``: PUT) or partial (``partial=True``: PATCH) configuration."""

    connection_server = Text(
        allow_none=True,
        validate=[NoControlChars(), HostName()],
        metadata={"description": "The solution's own relay; none means the service's relay."},
    )
    connection_user = user_field(allow_none=True)
    connection_password = password_field(
        allow_none=True, metadata={"description": "Write-only: stored encrypted."}
    )
    connection_port = port_field(
        allow_none=True, metadata={"description": "None: 587 for smtp, 465 for smtps, 25."}
    )
    connection_scheme = scheme_field(allow_none=True)
    hlimit = hlimit_field(
        data_key="hLimit",
        attribute="hLimit",
        allow_none=True,
        metadata={"description": "Messages per hour (a token bucket); 0 stops sending."},
    )
    hlimit_policy = Text(
        data_key="hLimit_policy",
        attribute="hLimit_policy",
        allow_none=True,
        validate=OneOf(POLICIES, error='Must be "reject" or "defer".'),
        metadata={"description": "When the bucket is empty: answer 429, or hold the message."},
    )

    def __init__(self, *, hlimit_default: int, partial: bool = False, **kwargs: Any):
        super().__init__(partial=partial, **kwargs)
        self.defaults = config_defaults(hlimit_default)
        for field in self.fields.values():
            default = self.defaults.get(field.attribute or field.name or "")
            if default is not None and not partial:
                field.metadata = {**field.metadata, "json_schema": {"default": default}}

    @post_load
    def _defaults(self, data: dict[str, Any], *, partial: Any, **_: Any) -> dict[str, Any]:
        loaded = {key: value for key, value in data.items() if key not in self.defaults}
        keys = data if partial else self.defaults
        for key in keys:
            if key in self.defaults:
                value = data.get(key)
                loaded[key] = self.defaults[key] if value is None else value
        if loaded.get("connection_server"):
            loaded["connection_server"] = loaded["connection_server"].lower()
        return loaded


class SolutionCreateSchema(SolutionConfigSchema):
    """``POST /solutions``: ``solution_id`` (it goes into Redis keys) plus a configuration."""

    solution_id = Text(
        required=True,
        validate=FullMatch(
            SOLUTION_ID,
            "Must be 1 to 63 characters: lower-case letters, digits, '_' and '-', "
            "starting with a letter or a digit.",
        ),
    )


def make_config_schema(settings: Settings, *, partial: bool = False) -> SolutionConfigSchema:
    """The PUT (``partial=False``) or PATCH (``partial=True``) schema; build it once."""
    return SolutionConfigSchema(hlimit_default=settings.hlimit_default, partial=partial)


def make_create_schema(settings: Settings) -> SolutionCreateSchema:
    return SolutionCreateSchema(hlimit_default=settings.hlimit_default)
