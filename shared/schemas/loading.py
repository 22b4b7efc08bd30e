"""From marshmallow's errors to the API's one 400 body.

``fields`` mirrors the request: a key per bad field under its JSON name, nested objects as
nested dicts, each leaf a list of messages. Errors of array items are listed under the
array, each message prefixed with the item's 0-based position (``"Item 2: ..."``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import marshmallow

from postroom.shared import errors
from postroom.shared.schemas.validators import CONTROL

SCHEMA_KEY = marshmallow.exceptions.SCHEMA  # "_schema": an error of the object as a whole
MAX_KEY = 64  # unknown keys are echoed back; a 1 MiB key is not
MAX_NAMED = 10  # fields named in the one-line summary
_CONTROL = re.compile(f"[{CONTROL}]")


def load_or_raise(schema: marshmallow.Schema, data: Any) -> dict[str, Any]:
    """``schema.load(data)``, or :class:`postroom.shared.errors.ValidationError` (400)."""
    if not isinstance(data, Mapping):
        raise errors.ValidationError("The request body must be a JSON object.")
    try:
        loaded: dict[str, Any] = schema.load(data)
    except marshmallow.ValidationError as error:
        fields = convert_messages(error.normalized_messages())
        raise errors.ValidationError(summary(fields), fields=fields) from None
    return loaded


def convert_messages(messages: Mapping[Any, Any]) -> dict[str, Any]:
    """marshmallow's ``error.messages`` as the ``fields`` of the error body."""
    fields: dict[str, Any] = {}
    for key, value in messages.items():
        name = _clip(str(key))
        if isinstance(value, Mapping):
            if all(isinstance(k, int) for k in value):
                fields[name] = _item_messages(value)
            elif set(value) == {SCHEMA_KEY}:
                fields[name] = _strings(value[SCHEMA_KEY])
            else:
                fields[name] = convert_messages(value)
        else:
            fields[name] = _strings(value)
    return fields


def summary(fields: Mapping[str, Any]) -> str:
    """``"invalid fields: connection.port, to"``: the dotted path of every bad field."""
    paths = sorted(_paths(fields))
    named = ", ".join(paths[:MAX_NAMED])
    more = f" and {len(paths) - MAX_NAMED} more" if len(paths) > MAX_NAMED else ""
    return f"invalid fields: {named}{more}"


def _paths(fields: Mapping[str, Any], prefix: str = "") -> list[str]:
    paths: list[str] = []
    for key, value in fields.items():
        path = f"{prefix}{key}"
        paths.extend(_paths(value, f"{path}.") if isinstance(value, Mapping) else [path])
    return paths


def _item_messages(items: Mapping[int, Any]) -> list[str]:
    return [
        f"Item {index}: {message}" for index in sorted(items) for message in _flat(items[index])
    ]


def _flat(value: Any) -> list[str]:
    """An item's messages; those of an object's fields named (``"filename: Must …"``)."""
    if isinstance(value, Mapping):
        return [
            message if key == SCHEMA_KEY else f"{_clip(str(key))}: {message}"
            for key, inner in value.items()
            for message in _flat(inner)
        ]
    return _strings(value)


def _strings(value: Any) -> list[str]:
    if isinstance(value, list | tuple):
        return [str(v) for v in value]
    return [str(value)]


def _clip(key: str) -> str:
    """An unknown key as echoed back: at most ``MAX_KEY`` characters, no control ones."""
    key = _CONTROL.sub("\ufffd", key)
    return key if len(key) <= MAX_KEY else key[:MAX_KEY] + "..."
