"""The bodies of the template routes (``PUT …/templates/{name}``, ``POST …/render``), and a
send's ``template`` and ``template_data``."""

from __future__ import annotations

from typing import Any, ClassVar

from marshmallow import ValidationError, fields, validates_schema
from marshmallow.validate import Length

from postroom.api.templates.store import PARTS, check_syntax
from postroom.shared.schemas.fields import StrictSchema, Text
from postroom.shared.schemas.validators import FullMatch, NoControlChars

TEMPLATE_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"


def template_name_field(**kwargs: Any) -> Text:
    return Text(validate=FullMatch(TEMPLATE_NAME, "Must be 1 to 64 letters, digits, '.', "
                                   "'_' or '-', starting with a letter or digit."), **kwargs)


class TemplateData(fields.Dict):
    default_error_messages = {"invalid": "Must be a JSON object."}

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(keys=fields.String(), **kwargs)


class TemplateSchema(StrictSchema):
    """``{subject, text?, html?}``, Jinja2 sources; at least one of text and html. Each
    compiles, and together they are at most ``max_bytes`` of UTF-8."""

    json_schema: ClassVar[dict[str, Any]] = {
        "anyOf": [
            {"required": [part], "properties": {part: {"type": "string"}}}
            for part in ("text", "html")
        ]
    }

    subject = Text(required=True, validate=[NoControlChars(), Length(1, 10_000)])
    text = Text(allow_none=True, validate=NoControlChars(body=True))
    html = Text(allow_none=True, validate=NoControlChars(body=True))

    def __init__(self, max_bytes: int = 64 * 1024, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.max_bytes = max_bytes

    @validates_schema(skip_on_field_errors=True)
    def _check(self, data: dict[str, Any], **_: Any) -> None:
        if data.get("text") is None and data.get("html") is None:
            raise ValidationError("A template needs text, html or both.", "text")
        size = sum(len((data.get(p) or "").encode()) for p in PARTS)
        if size > self.max_bytes:
            raise ValidationError(
                f"At most {self.max_bytes} bytes in subject, text and html together.", "subject"
            )
        errors = {}
        for part in PARTS:
            source = data.get(part)
            problem = None if source is None else check_syntax(part, source)
            if problem is not None:
                errors[part] = [f"Not a valid template: {problem}"]
        if errors:
            raise ValidationError(errors)


class RenderSchema(StrictSchema):
    data = TemplateData(allow_none=True)
