"""Email addresses: validated with email-validator, returned in one normalized form.

Decisions (they hold for recipients, ``from``, suppressions and events alike):

- Bare addresses only: no display names (``A <a@b.c>``), no quoted local parts, no
  domain literals (``a@[127.0.0.1]``), no control characters, no surrounding spaces.
- No SMTPUTF8: the part before the ``@`` must be ASCII, so every relay can carry the
  message (SMTPUTF8 support is rare, and smtplib would fail late, in the worker).
- Internationalized domains are accepted (IDNA 2008 with UTS #46 mapping) and returned
  in their ASCII ``xn--`` form: that is email-validator's normalized address with the
  domain A-label-encoded (its ``ascii_email``). It goes into SMTP commands and headers
  as it is, and one address has one spelling for suppressions and logs.
- Mixed-script domain labels are refused (homographs such as ``pаypal.com`` with a
  Cyrillic ``а``). A label may use one script, or one of the combinations that Unicode
  TS #39 calls "highly restrictive": Latin with Han, Hiragana and Katakana (Japanese),
  with Han and Bopomofo (Chinese), or with Han and Hangul (Korean). Digits, hyphens,
  marks and modifier letters belong to no script here. Whole-script lookalikes (a label
  made only of Cyrillic letters that look Latin) are not detected; their ``xn--`` form
  shows in every task document and log line.
- The local part keeps its case (mailbox names may be case-sensitive); the domain is
  lower-cased. Compare addresses with :func:`address_key`.

Most addresses are plain ASCII ``dot-atom@domain``; for those the verdict on the domain, the
costly part of email-validator's work, is kept per domain (:func:`_simple`): the part
before the ``@`` is judged by the same rule email-validator applies to it, and anything
else takes the full validation. ``tests/test_addresses.py`` holds both paths to the same
answers.
"""

from __future__ import annotations

import functools
import re
import unicodedata

from email_validator import EmailNotValidError, ValidatedEmail, validate_email
from email_validator.rfc_constants import CASE_INSENSITIVE_MAILBOX_NAMES, EMAIL_MAX_LENGTH
from marshmallow import ValidationError

from postroom.shared.schemas.validators import NoControlChars

_NO_CONTROLS = NoControlChars()

_HIGHLY_RESTRICTIVE = (
    frozenset({"LATIN", "HAN", "HIRAGANA", "KATAKANA"}),
    frozenset({"LATIN", "HAN", "BOPOMOFO"}),
    frozenset({"LATIN", "HAN", "HANGUL"}),
)


def normalize_address(value: str, *, check_dns: bool = False) -> str:
    """The normalized ASCII form of ``value``; ``ValidationError`` with a message if it is
    not a valid bare address (or, with ``check_dns``, its domain accepts no mail)."""
    _NO_CONTROLS(value)
    if check_dns:
        return _normalize(value, check_dns=True)
    return _normalize_cached(value)


def address_key(address: str) -> str:
    """The key under which two spellings of one normalized address compare equal."""
    return address.lower()


@functools.lru_cache(maxsize=8192)
def _normalize_cached(value: str) -> str:
    # Without DNS the answer depends on the text alone; senders repeat their recipients.
    simple = _simple(value)
    return simple if simple is not None else _normalize(value, check_dns=False)


# RFC 5322's dot-atom (email-validator's DOT_ATOM_TEXT) before the @, ASCII labels after it
_ATOM = r"[a-zA-Z0-9_!#$%&'*+\-/=?^`{|}~]+"
_SIMPLE = re.compile(rf"({_ATOM}(?:\.{_ATOM})*)@([a-zA-Z0-9-]+(?:\.[a-zA-Z0-9-]+)*)")


def _simple(value: str) -> str | None:
    """The normalized form of a plain ASCII address whose domain email-validator accepts
    as it is (no IDN), or None: the full validation then gives the answer (and the error).
    The local part's own rule is the regular expression; the mailbox names email-validator
    lower-cases (``Postmaster``) and lengths near the limit go the full way."""
    match = _SIMPLE.fullmatch(value)
    if match is None or len(value) > EMAIL_MAX_LENGTH:
        return None
    local, domain = match.groups()
    if local.lower() in CASE_INSENSITIVE_MAILBOX_NAMES:
        return None
    ascii_domain = _plain_domain(domain.lower())
    return None if ascii_domain is None else f"{local}@{ascii_domain}"


@functools.lru_cache(maxsize=4096)
def _plain_domain(domain: str) -> str | None:
    """``domain`` as email-validator normalizes it, when it accepts it and it is not an
    internationalized name; else None."""
    try:
        info = _validated(f"a@{domain}", check_dns=False)
    except EmailNotValidError:
        return None
    return info.ascii_domain if info.domain == info.ascii_domain else None


def _validated(value: str, *, check_dns: bool) -> ValidatedEmail:
    return validate_email(
        value,
        check_deliverability=check_dns,
        allow_smtputf8=False,
        allow_quoted_local=False,
        allow_domain_literal=False,
        allow_display_name=False,
        allow_empty_local=False,
    )


def _normalize(value: str, *, check_dns: bool) -> str:
    try:
        info = _validated(value, check_dns=check_dns)
    except EmailNotValidError as error:
        raise ValidationError(f"Not a valid email address: {error}") from None
    mixed = _mixed_script_label(info.domain)
    if mixed:
        raise ValidationError(
            f"Not a valid email address: the domain label {mixed!r} mixes letters of "
            "different scripts, the mark of a lookalike domain."
        )
    if info.ascii_email is None:  # not reached: set whenever SMTPUTF8 is refused
        raise ValidationError("Not a valid email address: it has no ASCII form.")
    return info.ascii_email


def _mixed_script_label(domain: str) -> str | None:
    """The first label of ``domain`` whose letters mix scripts beyond the allowed sets."""
    if domain.isascii():
        return None
    for label in domain.split("."):
        scripts = {_script(char) for char in label if unicodedata.category(char) in _LETTERS}
        if len(scripts) > 1 and not any(scripts <= allowed for allowed in _HIGHLY_RESTRICTIVE):
            return label
    return None


# Modifier letters (Lm: the Japanese prolonged sound mark, iteration marks) are shared.
_LETTERS = frozenset({"Lu", "Ll", "Lt", "Lo"})


def _script(char: str) -> str:
    """The script of a letter, from its Unicode name: ``LATIN SMALL LETTER A`` → LATIN.
    The standard library has no Script property; for the scripts in use in domain names
    the name's first word is the script (CJK ideographs aside). A few historic scripts
    share a first word ("OLD ..."); telling them apart does not matter here."""
    word = unicodedata.name(char, "UNKNOWN").split(" ", 1)[0]
    return "HAN" if word == "CJK" else word
