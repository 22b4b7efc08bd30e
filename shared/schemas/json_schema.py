"""JSON Schema (2020-12, as OpenAPI 3.1 uses it) from the marshmallow schemas that
validate requests, so the published document and the validation cannot drift apart.

Handled: String, Integer, Float, Boolean, List, Nested (a named component), ``required``,
``allow_none`` (``null`` allowed), ``load_default`` (``default``), the validators Length,
Range and OneOf (``enum``), and any field class or validator that carries a
``json_schema`` dict; ``metadata={"description": ..., "json_schema": {...}}`` on a field,
and a ``json_schema`` class attribute on a schema, are merged last.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from marshmallow import Schema, fields, missing
from marshmallow.validate import Length, OneOf, Range

REF_PREFIX = "#/components/schemas/"


class Converter:
    """Converts schemas; nested schemas become entries of ``components``."""

    def __init__(self, name_of: Callable[[Schema], str] | None = None) -> None:
        self.components: dict[str, dict[str, Any]] = {}
        self.name_of = name_of or _default_name

    def ref(
        self, schema: Schema, name: str | None = None, description: str | None = None
    ) -> dict[str, Any]:
        """Register ``schema`` as a component (once) and return a ``$ref`` to it."""
        name = name or self.name_of(schema)
        if name not in self.components:
            self.components[name] = {}  # placeholder: a schema may refer to itself
            self.components[name] = self.object(schema, description)
        return {"$ref": REF_PREFIX + name}

    def object(self, schema: Schema, description: str | None = None) -> dict[str, Any]:
        """The object schema of ``schema``; ``description`` defaults to its docstring's
        first paragraph."""
        properties: dict[str, Any] = {}
        required: list[str] = []
        for name, field in schema.load_fields.items():
            key = field.data_key or name
            properties[key] = self.field(field)
            if field.required:
                required.append(key)
        out: dict[str, Any] = {"type": "object"}
        doc = description or (type(schema).__doc__ or "").strip()
        if doc:
            out["description"] = " ".join(doc.split("\n\n")[0].split())
        out["properties"] = properties
        if required:
            out["required"] = required
        out["additionalProperties"] = False
        out.update(getattr(schema, "json_schema", {}))
        return out

    def field(self, field: fields.Field[Any]) -> dict[str, Any]:
        out = self._base(field)
        for validator in field.validators:
            _merge(out, _validator(validator, out.get("type")))
        _merge(out, getattr(field, "json_schema", {}))
        if field.load_default is not missing and not callable(field.load_default):
            out["default"] = field.load_default
        if field.metadata.get("description"):
            out["description"] = field.metadata["description"]
        _merge(out, field.metadata.get("json_schema", {}))
        return _nullable(out) if field.allow_none else out

    def _base(self, field: fields.Field[Any]) -> dict[str, Any]:
        if isinstance(field, fields.Nested):
            return self.ref(field.schema)
        if isinstance(field, fields.List):
            return {"type": "array", "items": self.field(field.inner)}
        if isinstance(field, fields.Boolean):
            return {"type": "boolean"}
        if isinstance(field, fields.Integer):
            return {"type": "integer"}
        if isinstance(field, fields.Number):
            return {"type": "number"}
        if isinstance(field, fields.String):
            return {"type": "string"}
        if isinstance(field, fields.Dict):
            return {"type": "object"}
        return {}


def _default_name(schema: Schema) -> str:
    name = type(schema).__name__
    return name.removesuffix("Schema") or name


def _validator(validator: Any, type_: Any) -> dict[str, Any]:
    if isinstance(validator, Length):
        low, high = ("minItems", "maxItems") if type_ == "array" else ("minLength", "maxLength")
        out: dict[str, Any] = {}
        if validator.equal is not None:
            return {low: validator.equal, high: validator.equal}
        if validator.min is not None:
            out[low] = validator.min
        if validator.max is not None:
            out[high] = validator.max
        return out
    if isinstance(validator, Range):
        out = {}
        if validator.min is not None:
            out["minimum" if validator.min_inclusive else "exclusiveMinimum"] = validator.min
        if validator.max is not None:
            out["maximum" if validator.max_inclusive else "exclusiveMaximum"] = validator.max
        return out
    if isinstance(validator, OneOf):
        return {"enum": list(validator.choices)}
    extra: dict[str, Any] = getattr(validator, "json_schema", {})
    return extra


def _merge(out: dict[str, Any], extra: dict[str, Any]) -> None:
    """Add ``extra`` to ``out``; a second ``pattern`` (one rule each) goes into ``allOf``."""
    for key, value in extra.items():
        if key in ("pattern", "not", "anyOf") and key in out:
            out.setdefault("allOf", []).append({key: value})
        else:
            out[key] = value


def _nullable(out: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in out:
        return {"anyOf": [out, {"type": "null"}]}
    out = dict(out)
    if "type" in out:
        out["type"] = [out["type"], "null"]
    if "enum" in out and None not in out["enum"]:
        out["enum"] = [*out["enum"], None]
    return out
