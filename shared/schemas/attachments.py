"""``attachments``: each decoded from base64 and checked at intake.

A filename is a name, never a path; executable types are refused by extension and by
declared type; a ``content_id`` makes the part inline and must be referenced as ``cid:`` in
the html. The loaded value is a list of :class:`Attachment` (the bytes decoded); the job
carries only :meth:`Attachment.meta` (:mod:`postroom.shared.attachments` keeps the bytes).
"""

from __future__ import annotations

import base64
import binascii
import mimetypes
import re
from dataclasses import dataclass
from typing import Any

from marshmallow import ValidationError, fields, post_load, validates_schema
from marshmallow.validate import Length

from postroom.shared.records import AttachmentMeta
from postroom.shared.schemas.fields import NULL, REQUIRED, StrictSchema, Text
from postroom.shared.schemas.validators import NoControlChars

MAX_ATTACHMENTS = 20
MAX_FILENAME = 255
MAX_CONTENT_ID = 100

#: executable types refused as attachments, by extension and by declared type
REFUSED_EXTENSIONS = frozenset(
    {".exe", ".bat", ".cmd", ".com", ".js", ".vbs", ".scr", ".msi", ".jar"}
)
REFUSED_TYPES = frozenset({
    "application/x-msdownload", "application/x-msdos-program", "application/x-ms-installer",
    "application/x-msi", "application/java-archive", "application/x-java-archive",
    "application/javascript", "text/javascript", "application/x-javascript",
    "text/vbscript", "application/x-bat", "application/x-sh",
})  # fmt: skip

_TOKEN = r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]"
_CONTENT_TYPE = re.compile(_TOKEN + "{0,63}/" + _TOKEN + "{0,126}")
# a Content-ID's text (an RFC 5322 msg-id without its angle brackets, dot-atom characters)
_CONTENT_ID = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.@-]+")


@dataclass(frozen=True)
class Attachment:
    """One attachment, decoded and checked."""

    filename: str
    content_type: str
    content_id: str | None
    content: bytes

    def meta(self) -> AttachmentMeta:
        """What the job carries of it (the bytes are stored apart:
        :mod:`postroom.shared.attachments`)."""
        return {"filename": self.filename, "content_type": self.content_type,
                "content_id": self.content_id, "size": len(self.content)}  # fmt: skip


class StringLoaded(fields.Field):
    """A JSON string loaded into another type."""

    default_error_messages = {"invalid": "Must be a string.", "null": NULL, "required": REQUIRED}
    json_schema: dict[str, Any] = {"type": "string"}

    def _text(self, value: Any) -> str:
        if not isinstance(value, str):
            raise self.make_error("invalid")
        return value


# with a length that is a multiple of four, padded groups of four: the published pattern
# (which also allows line breaks anywhere)
_BASE64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")


class Base64Content(StringLoaded):
    """Standard base64 (RFC 4648, padded, no line breaks needed), decoded to bytes."""

    json_schema: dict[str, Any] = {
        "type": "string",
        "contentEncoding": "base64",
        # what the loader takes: groups of four, padded, line breaks anywhere
        "pattern": "^(?:(?:[\\r\\n]*[A-Za-z0-9+/]){4})*"
        "(?:(?:[\\r\\n]*[A-Za-z0-9+/]){2}[\\r\\n]*=[\\r\\n]*="
        "|(?:[\\r\\n]*[A-Za-z0-9+/]){3}[\\r\\n]*=)?[\\r\\n]*$",
    }

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> bytes:
        text = self._text(value)
        if "\n" in text or "\r" in text:  # MIME-style lines; a copy only then
            text = text.replace("\r", "").replace("\n", "")
        try:
            if len(text) % 4 or not _BASE64.fullmatch(text):  # b64decode takes "QUJD=" too
                raise ValueError(text)
            return base64.b64decode(text.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError, ValueError):
            raise ValidationError(
                "Must be standard base64 (A–Z, a–z, 0–9, +, /, = padding)."
            ) from None


def _any_case(text: str) -> str:
    """``text`` as a pattern matching it in any case (ECMA-262 has no inline ``(?i)``)."""
    return "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else re.escape(c) for c in text)


def _refused_extensions() -> list[str]:
    """The extensions refused by name, and those whose guessed type is refused."""
    mimetypes.init()
    known = {**mimetypes.types_map, **mimetypes.common_types}
    return sorted(REFUSED_EXTENSIONS | {e for e, t in known.items() if t in REFUSED_TYPES})


def filename_json_schema() -> dict[str, Any]:
    """The rules of ``_check`` on a file name, as the OpenAPI document states them."""
    refused = _refused_extensions()
    executable = "|".join(_any_case(ext.lstrip(".")) for ext in refused)
    return {
        "allOf": [  # beside the control-character pattern of NoControlChars
            {"pattern": r"^[^/\\]*$"},  # not a path
            {"not": {"pattern": r"^\s|\s$"}},  # no spaces around it
            {"not": {"pattern": r"^[ .]*$"}},  # more than dots and spaces
            {"not": {"pattern": rf"\.(?:{executable})[ .]*$"}},
        ],
        "description": "A file name, not a path, without spaces around it; executable "
        "types are refused (" + ", ".join(refused) + ", in any case).",
    }


class AttachmentSchema(StrictSchema):
    filename = Text(required=True, validate=[NoControlChars(), Length(1, MAX_FILENAME)],
                    metadata={"json_schema": filename_json_schema()})  # fmt: skip
    content = Base64Content(required=True)
    content_type = Text(allow_none=True, validate=Length(max=191), metadata={"json_schema": {
        "pattern": f"^{_TOKEN}{{0,63}}/{_TOKEN}{{0,126}}$",
        "not": {"enum": sorted(REFUSED_TYPES)},
        "description": "A MIME type, type/subtype; executable types are refused (in any case)."
    }})  # fmt: skip
    content_id = Text(allow_none=True, validate=Length(1, MAX_CONTENT_ID),
                      metadata={"json_schema": {"pattern": f"^{_CONTENT_ID.pattern}$"}})

    @validates_schema(skip_on_field_errors=False)
    def _check(self, data: dict[str, Any], **_: Any) -> None:
        name = data.get("filename")
        if isinstance(name, str):
            if "/" in name or "\\" in name or name.strip(" .") == "":
                raise ValidationError("Must be a file name, not a path.", "filename")
            if name != name.strip():
                raise ValidationError("Must not start or end with spaces.", "filename")
            if _extension(name) in REFUSED_EXTENSIONS:
                raise ValidationError(
                    f"Executable files are refused ({', '.join(sorted(REFUSED_EXTENSIONS))}).",
                    "filename",
                )
        kind = data.get("content_type")
        if isinstance(kind, str):
            if not _CONTENT_TYPE.fullmatch(kind):
                raise ValidationError("Must be a MIME type, type/subtype.", "content_type")
            if kind.lower() in REFUSED_TYPES:
                raise ValidationError("Executable types are refused.", "content_type")
        cid = data.get("content_id")
        if isinstance(cid, str) and not _CONTENT_ID.fullmatch(cid):
            raise ValidationError(
                "Must be letters, digits and !#$%&'*+/=?^_`{|}~.@- only, without <>.",
                "content_id",
            )

    @post_load
    def _attachment(self, data: dict[str, Any], **_: Any) -> Attachment:
        name = data["filename"]
        kind = data.get("content_type") or mimetypes.guess_type(name, strict=False)[0]
        kind = (kind or "application/octet-stream").lower()
        if kind in REFUSED_TYPES:
            raise ValidationError("Executable types are refused.", "filename")
        return Attachment(name, kind, data.get("content_id"), data["content"])


def _extension(name: str) -> str:
    """The extension a mail client would act on: trailing dots and spaces do not hide one."""
    stripped = name.rstrip(" .").lower()
    dot = stripped.rfind(".")
    return stripped[dot:] if dot >= 0 else ""


class AttachmentList(fields.List):
    default_error_messages = {"invalid": "Must be a list of attachments."}

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(fields.Nested(AttachmentSchema), validate=Length(
            max=MAX_ATTACHMENTS, error=f"At most {MAX_ATTACHMENTS} attachments."), **kwargs)


def check_inline(attachments: list[Attachment], html: str | None) -> None:
    """Every ``content_id`` is used once and referenced as ``cid:`` in ``html``; a
    ValidationError naming the attachment's index otherwise."""
    errors: dict[int, dict[str, list[str]]] = {}
    seen: set[str] = set()
    for index, item in enumerate(attachments):
        cid = item.content_id
        if cid is None:
            continue
        if cid in seen:
            errors[index] = {"content_id": ["Given to two attachments."]}
        elif html is None or f"cid:{cid}" not in html:
            errors[index] = {"content_id": [f'Not referenced in html (as "cid:{cid}").']}
        seen.add(cid)
    if errors:
        raise ValidationError({"attachments": errors})


def check_attachment_size(attachments: list[Attachment], limit: int) -> None:
    total = sum(len(a.content) for a in attachments)
    if total > limit:
        raise ValidationError(
            {"attachments": [f"At most {limit} bytes decoded in all (got {total})."]})
