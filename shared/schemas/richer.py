"""The fields a send may carry beyond the seed's: ``reply_to``, ``headers``,
``attachments``, ``template``/``template_data`` and ``send_at``.

What they load to (keys of the loaded request)::

    "reply_to": [str],                                # normalized addresses, maybe empty
    "headers": {name: value},                         # in the order given
    "attachments": [Attachment],                      # decoded bytes, checked
    "template": str | None, "template_data": dict,    # rendered at intake (shared.templates)
    "send_at": float | None                           # Unix seconds; None: now

Header names are ``X-…`` or ``List-Unsubscribe``/``List-Unsubscribe-Post``, values printable
ASCII without encoded-words (header injection is a 400, never a sent header). An attachment's
filename is a name, never a path; executable types are refused by extension and by type.
"""

from __future__ import annotations

import base64
import binascii
import mimetypes
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from marshmallow import ValidationError, fields, post_load, validates_schema
from marshmallow.validate import Length

from shared.schemas.fields import NULL, REQUIRED, StrictSchema, Text
from shared.schemas.text import CONTROL, NoControlChars

MAX_REPLY_TO = 5
MAX_HEADERS = 20
MAX_HEADER_VALUE = 900  # the header line stays below RFC 5322's 998 characters
MAX_ATTACHMENTS = 20
MAX_FILENAME = 255
MAX_CONTENT_ID = 100
MAX_SCHEDULE_S = 30 * 86400
MAX_TEMPLATE_DATA_KEYS = 1000

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

LIST_UNSUBSCRIBE = "List-Unsubscribe"
LIST_UNSUBSCRIBE_POST = "List-Unsubscribe-Post"
ONE_CLICK = "List-Unsubscribe=One-Click"

# RFC 5322 field names are printable ASCII without ":"; custom ones here start with "X-"
_X_NAME = re.compile(r"X-[A-Za-z0-9][A-Za-z0-9-]{0,62}")
_HEADER_VALUE = re.compile(r"[\x20-\x7e]*")
_ENCODED_WORD = re.compile(r"=\?.*\?=")
# List-Unsubscribe: one or more <URI> separated by commas (RFC 2369)
_UNSUBSCRIBE = re.compile(r"<([^<>\s]+)>")
_TOKEN = r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]"
_CONTENT_TYPE = re.compile(_TOKEN + "{0,63}/" + _TOKEN + "{0,126}")
# a Content-ID's text (an RFC 5322 msg-id without its angle brackets, dot-atom characters)
_CONTENT_ID = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.@-]+")
# RFC 3339 with a required offset
_RFC3339 = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(?:\.\d{1,9})?(?:[Zz]|[+-]\d{2}:\d{2})"
)
_CONTROL = re.compile(f"[{CONTROL}]")


@dataclass(frozen=True)
class Attachment:
    """One attachment, decoded and checked."""

    filename: str
    content_type: str
    content_id: str | None
    content: bytes

    def meta(self) -> dict[str, Any]:
        """What the job carries of it (the bytes are stored apart: :mod:`shared.attachments`)."""
        return {"filename": self.filename, "content_type": self.content_type,
                "content_id": self.content_id, "size": len(self.content)}  # fmt: skip


class HeadersField(fields.Dict):
    """An object of custom header names to values (see the module's docstring)."""

    default_error_messages = {"invalid": "Must be an object of header names to strings."}
    json_schema: dict[str, Any] = {
        "maxProperties": MAX_HEADERS,
        "propertyNames": {"pattern": "^(X-[A-Za-z0-9][A-Za-z0-9-]{0,62}|List-Unsubscribe"
                                     "|List-Unsubscribe-Post)$"},
        "additionalProperties": {"type": "string", "maxLength": MAX_HEADER_VALUE,
                                 "pattern": "^[\\u0020-\\u007e]*$"},
    }  # fmt: skip

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        if not isinstance(value, Mapping):
            raise self.make_error("invalid")
        return check_headers(value)


def check_headers(value: Mapping[str, Any]) -> dict[str, str]:
    """The custom headers, checked; a ValidationError naming what is wrong otherwise."""
    if len(value) > MAX_HEADERS:
        raise ValidationError(f"At most {MAX_HEADERS} headers.")
    problems: list[str] = []
    seen: dict[str, str] = {}
    for name, text in value.items():
        canonical = _header_name(name)
        if canonical is None:
            problems.append(f"{_shown(name)}: a header name must be X-… (letters, digits, "
                            "hyphens), List-Unsubscribe or List-Unsubscribe-Post.")  # fmt: skip
            continue
        if canonical.lower() in {s.lower() for s in seen}:
            problems.append(f"{canonical}: given twice.")
            continue
        if not isinstance(text, str):
            problems.append(f"{canonical}: the value must be a string.")
            continue
        found = _CONTROL.search(text)
        if found:
            problems.append(f"{canonical}: must not contain control characters "
                            f"(found U+{ord(found.group()):04X}).")  # fmt: skip
        elif not _HEADER_VALUE.fullmatch(text):
            problems.append(f"{canonical}: printable ASCII only.")
        elif _ENCODED_WORD.search(text):
            problems.append(f'{canonical}: must not contain RFC 2047 encoded-words ("=?...?=").')
        elif not text.strip():
            problems.append(f"{canonical}: must not be empty.")
        elif len(text) > MAX_HEADER_VALUE:
            problems.append(f"{canonical}: at most {MAX_HEADER_VALUE} characters.")
        else:
            seen[canonical] = text
    if not problems:
        problems += _list_unsubscribe(seen)
    if problems:
        raise ValidationError(problems)
    return seen


def _shown(name: Any) -> str:
    return repr(name[:40]) if isinstance(name, str) else "a name"


def _header_name(name: Any) -> str | None:
    if not isinstance(name, str):
        return None
    if name.lower() == LIST_UNSUBSCRIBE.lower():
        return LIST_UNSUBSCRIBE
    if name.lower() == LIST_UNSUBSCRIBE_POST.lower():
        return LIST_UNSUBSCRIBE_POST
    if _X_NAME.fullmatch(name):
        return name
    return None


def _list_unsubscribe(headers: Mapping[str, str]) -> list[str]:
    """RFC 2369 and RFC 8058: ``List-Unsubscribe`` is ``<uri>`` items (``https:`` or
    ``mailto:``); ``List-Unsubscribe-Post`` is exactly ``List-Unsubscribe=One-Click`` and
    needs a ``List-Unsubscribe`` with an ``https`` URI."""
    problems = []
    uris: list[str] = []
    value = headers.get(LIST_UNSUBSCRIBE)
    if value is not None:
        items = [item.strip() for item in value.split(",")]
        for item in items:
            match = _UNSUBSCRIBE.fullmatch(item)
            if match is None or not match.group(1).lower().startswith(("https://", "mailto:")):
                problems.append(f"{LIST_UNSUBSCRIBE}: must be one or more <https://…> or "
                                "<mailto:…> items separated by commas.")  # fmt: skip
                break
            uris.append(match.group(1))
    post = headers.get(LIST_UNSUBSCRIBE_POST)
    if post is not None:
        if post != ONE_CLICK:
            problems.append(f"{LIST_UNSUBSCRIBE_POST}: must be {ONE_CLICK!r} (RFC 8058).")
        elif not any(uri.lower().startswith("https://") for uri in uris):
            problems.append(f"{LIST_UNSUBSCRIBE_POST}: needs a {LIST_UNSUBSCRIBE} header with "
                            "an https URI (RFC 8058).")  # fmt: skip
    return problems


class _StringLoaded(fields.Field):
    """A JSON string loaded into another type."""

    default_error_messages = {"invalid": "Must be a string.", "null": NULL, "required": REQUIRED}
    json_schema: dict[str, Any] = {"type": "string"}

    def _text(self, value: Any) -> str:
        if not isinstance(value, str):
            raise self.make_error("invalid")
        return value


class Base64Content(_StringLoaded):
    """Standard base64 (RFC 4648, padded, no line breaks needed), decoded to bytes."""

    json_schema: dict[str, Any] = {"type": "string", "contentEncoding": "base64"}

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> bytes:
        text = self._text(value)
        if "\n" in text or "\r" in text:  # MIME-style lines; a copy only then
            text = text.replace("\r", "").replace("\n", "")
        try:
            return base64.b64decode(text.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError, ValueError):
            raise ValidationError(
                "Must be standard base64 (A–Z, a–z, 0–9, +, /, = padding)."
            ) from None


class AttachmentSchema(StrictSchema):
    filename = Text(required=True, validate=[NoControlChars(), Length(1, MAX_FILENAME)])
    content = Base64Content(required=True)
    content_type = Text(allow_none=True, validate=Length(max=191))
    content_id = Text(allow_none=True, validate=Length(1, MAX_CONTENT_ID))

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


class SendAt(_StringLoaded):
    """An RFC 3339 time with an offset, loaded as Unix seconds; at most 30 days ahead."""

    json_schema: dict[str, Any] = {"type": "string", "format": "date-time"}

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> float:
        text = self._text(value)
        if not _RFC3339.fullmatch(text):
            raise ValidationError(
                "Must be an RFC 3339 time with an offset, e.g. 2030-01-31T09:00:00Z.")
        try:
            when = datetime.fromisoformat(text.upper().replace("Z", "+00:00")).timestamp()
        except ValueError:
            raise ValidationError("Must be a real date and time.") from None
        if when > time.time() + MAX_SCHEDULE_S:
            raise ValidationError("At most 30 days ahead.")
        return when


TEMPLATE_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"


def template_name_field(**kwargs: Any) -> Text:
    from shared.schemas.text import FullMatch

    return Text(validate=FullMatch(TEMPLATE_NAME, "Must be 1 to 64 letters, digits, '.', "
                                   "'_' or '-', starting with a letter or digit."), **kwargs)


class TemplateData(fields.Dict):
    default_error_messages = {"invalid": "Must be a JSON object."}

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(keys=fields.String(), **kwargs)


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
