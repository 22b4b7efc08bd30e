"""``reply_to``'s limit and ``headers``: a send's custom header names and values.

Names are ``X-…`` (letters, digits, hyphens) or ``List-Unsubscribe``/``List-Unsubscribe-Post``;
values are printable ASCII without control characters or RFC 2047 encoded-words (header
injection is a 400, never a sent header). ``List-Unsubscribe`` follows RFC 2369 and
``List-Unsubscribe-Post`` RFC 8058 (one-click: it needs an ``https`` ``List-Unsubscribe``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from marshmallow import ValidationError, fields

from postroom.shared.schemas.validators import CONTROL

MAX_REPLY_TO = 5
MAX_HEADERS = 20
MAX_HEADER_VALUE = 900  # the header line stays below RFC 5322's 998 characters

LIST_UNSUBSCRIBE = "List-Unsubscribe"
LIST_UNSUBSCRIBE_POST = "List-Unsubscribe-Post"
ONE_CLICK = "List-Unsubscribe=One-Click"

# RFC 5322 field names are printable ASCII without ":"; custom ones here start with "X-"
_X_NAME = re.compile(r"X-[A-Za-z0-9][A-Za-z0-9-]{0,62}")
_HEADER_VALUE = re.compile(r"[\x20-\x7e]*")
_ENCODED_WORD = re.compile(r"=\?.*\?=")
# List-Unsubscribe: one or more <URI> separated by commas (RFC 2369)
_UNSUBSCRIBE = re.compile(r"<([^<>\s]+)>")
_CONTROL = re.compile(f"[{CONTROL}]")
# one List-Unsubscribe item, as the published pattern says it (schemes in any case)
_ITEM = ("<(?:[hH][tT][tT][pP][sS]://|[mM][aA][iI][lL][tT][oO]:)"
         "[\\u0021-\\u002b\\u002d-\\u003b\\u003d\\u003f-\\u007e]*>")  # not ,<> or space


class HeadersField(fields.Dict):
    """An object of custom header names to values (see the module's docstring)."""

    default_error_messages = {"invalid": "Must be an object of header names to strings."}
    json_schema: dict[str, Any] = {
        "maxProperties": MAX_HEADERS,
        "propertyNames": {"pattern": "^(X-[A-Za-z0-9][A-Za-z0-9-]{0,62}|List-Unsubscribe"
                                     "|List-Unsubscribe-Post)$"},
        "additionalProperties": {
            "type": "string", "maxLength": MAX_HEADER_VALUE,
            # printable ASCII, not only spaces; no RFC 2047 encoded-word
            "pattern": "^[\\u0020-\\u007e]*[\\u0021-\\u007e][\\u0020-\\u007e]*$",
            "not": {"pattern": "=\\?.*\\?="},
        },
        "properties": {
            LIST_UNSUBSCRIBE: {"type": "string", "maxLength": MAX_HEADER_VALUE,
                               "pattern": f"^ *{_ITEM} *(?:, *{_ITEM} *)*$",
                               "not": {"pattern": "=\\?.*\\?="}},
            LIST_UNSUBSCRIBE_POST: {"const": ONE_CLICK},
        },
        "dependentSchemas": {LIST_UNSUBSCRIBE_POST: {
            "required": [LIST_UNSUBSCRIBE],
            "properties": {LIST_UNSUBSCRIBE: {"pattern": "<[hH][tT][tT][pP][sS]://"}},
        }},
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
