"""Checks on text that ends up in SMTP commands or message headers.

Each check is a marshmallow validator that also says, as ``json_schema``, how the
OpenAPI document states the same rule (see :mod:`postroom.shared.schemas.json_schema`).
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from marshmallow import ValidationError
from marshmallow.validate import Validator

# C0, DEL, C1 (which holds U+0085 NEXT LINE), LINE and PARAGRAPH SEPARATOR, and lone
# UTF-16 surrogates (JSON "\ud800" decodes to one; it cannot be encoded as UTF-8).
_SURROGATES = "\ud800-\udfff"
CONTROL = "\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff"
# Message bodies may hold tabs, line breaks and form feeds; nothing else from C0.
BODY_CONTROL = "\x00-\x08\x0b\x0e-\x1f\ud800-\udfff"

_ENCODED_WORD = re.compile(r"=\?.*\?=", re.DOTALL)
_WHITESPACE = re.compile(r"\s")
_HOST_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def _escape(chars: str) -> str:
    """``chars`` (a character-class body) with each code point as ``\\uXXXX``: the JSON
    Schema pattern dialect (ECMA-262) and Python's ``re`` both read that form."""
    return re.sub(r"[^\-]", lambda m: f"\\u{ord(m.group()):04x}", chars)


def _char_name(char: str) -> str:
    return f"U+{ord(char):04X}"


class NoControlChars(Validator):
    """No control characters (see ``CONTROL``); ``body=True`` allows tab, CR, LF and FF."""

    def __init__(self, *, body: bool = False) -> None:
        self.chars = BODY_CONTROL if body else CONTROL
        self.regex = re.compile(f"[{self.chars}]")
        # published without the surrogate range: ECMA/Rust regex engines cannot hold one
        # (a generator then dropped the whole pattern), and JSON text cannot carry a lone
        # surrogate anyway (its escape is refused here all the same)
        published = self.chars.replace(_SURROGATES, "")
        self.json_schema: dict[str, Any] = {"pattern": f"^[^{_escape(published)}]*$"}

    def __call__(self, value: str) -> str:
        found = self.regex.search(value)
        if found:
            raise ValidationError(
                f"Must not contain control characters (found {_char_name(found.group())})."
            )
        return value


class NoEncodedWords(Validator):
    """No RFC 2047 encoded-words: a decoder would turn ``=?UTF-8?Q?=0D=0A?=`` into a
    line break inside the header. Unicode text needs none; the worker encodes it."""

    json_schema: dict[str, Any] = {"not": {"type": "string", "pattern": r"=\?[\s\S]*\?="}}

    def __call__(self, value: str) -> str:
        if _ENCODED_WORD.search(value):
            raise ValidationError(
                'Must not contain RFC 2047 encoded-words ("=?...?="); '
                "send the text as plain Unicode."
            )
        return value


class NoWhitespace(Validator):
    """No whitespace at all (the original ``^[^\\s\\t\\r\\n\\f]*$``, matched in full)."""

    json_schema: dict[str, Any] = {"pattern": r"^\S*$"}

    def __call__(self, value: str) -> str:
        if _WHITESPACE.search(value):
            raise ValidationError("Must not contain whitespace.")
        return value


class FullMatch(Validator):
    """The whole value matches ``pattern`` (``re.fullmatch``: no trailing-newline slip)."""

    def __init__(self, pattern: str, error: str) -> None:
        self.regex = re.compile(pattern)
        self.message = error
        self.json_schema: dict[str, Any] = {"pattern": f"^(?:{pattern})$"}

    def __call__(self, value: str) -> str:
        if not self.regex.fullmatch(value):
            raise ValidationError(self.message)
        return value


class HostName(Validator):
    """An ASCII host name (letters, digits, hyphens, dots; a trailing dot is allowed) or
    an IPv4/IPv6 address without brackets."""

    json_schema: dict[str, Any] = {
        "anyOf": [{"format": "hostname"}, {"format": "ipv4"}, {"format": "ipv6"}]
    }

    def __call__(self, value: str) -> str:
        if not _is_host_name(value) and not _is_ip_address(value):
            raise ValidationError(
                "Must be a host name (letters, digits, hyphens and dots; an "
                "internationalized name in its xn-- form) or an IP address."
            )
        return value


def _is_host_name(value: str) -> bool:
    name = value[:-1] if value.endswith(".") else value
    if not name or len(name) > 253:
        return False
    return all(_HOST_LABEL.fullmatch(label) for label in name.split("."))


def _is_ip_address(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True
