"""Reading a request's JSON body strictly: the right media type, UTF-8, no NaN, an object."""

from __future__ import annotations

import json
from typing import Any

from flask import request

from postroom.shared.errors import UnsupportedMediaType, ValidationError

MAX_DEPTH = 32


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _depth(value: Any, level: int = 0) -> int:
    if level > MAX_DEPTH:
        return level
    if isinstance(value, dict):
        return max((_depth(v, level + 1) for v in value.values()), default=level + 1)
    if isinstance(value, list):
        return max((_depth(v, level + 1) for v in value), default=level + 1)
    return level


def json_object() -> dict[str, Any]:
    """The body as a JSON object, or a clear 400/415 (the size limit is Flask's, 413)."""
    mimetype = request.mimetype
    if mimetype != "application/json":
        raise UnsupportedMediaType("the request body must be application/json")
    raw = request.get_data(cache=True)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValidationError("the request body is not valid UTF-8") from None
    if text.startswith("\ufeff"):
        text = text[1:]
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise ValidationError("the request body is nested too deeply") from None
    except ValueError as exc:
        raise ValidationError(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValidationError("the request body must be a JSON object")
    # nesting never exceeds the brackets written (those inside strings only add to the
    # count), so the walk is needed only for a body with more of them than the limit
    if text.count("{") + text.count("[") > MAX_DEPTH and _depth(data) > MAX_DEPTH:
        raise ValidationError("the request body is nested too deeply")
    return data
