"""Rules the server enforces beyond the request schemas' shapes, said in the OpenAPI document
in forms a generator from the document alone can use (patterns, enums), so that a request
the document calls valid is one the server takes (:func:`postroom.api.openapi.spec.build_spec` calls
:func:`state_rules` last).

- A caller's relay port: with no ``POSTROOM_SMTP_ALLOW_HOSTS``, only
  ``POSTROOM_SMTP_ALLOW_PORTS`` (an enum), and no plain-text scheme ``""``; with exempt hosts
  the description says which ports which hosts may use.
- Addresses: email-validator refuses the special-use domains (``.test``, ``.local``, …).
- A suppression's ``expires_at``: in the future and at most 100 years ahead: a year after
  this one (the document is built at start-up), up to 99 years on (a date later this year
  is taken too; the pattern is the part of the rule a generator can hold on to).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from email_validator import SPECIAL_USE_DOMAIN_NAMES

if TYPE_CHECKING:
    from postroom.shared.settings import Settings

Schema = dict[str, Any]


def _any_case(word: str) -> str:
    """``word`` as a pattern matching it in any case (ECMA-262 patterns, which JSON Schema
    uses, have no inline ``(?i)`` flag)."""
    return "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else c for c in word)


SPECIAL_USE = {
    "type": "string",
    "pattern": "@(?:[^@]*\\.)?(?:"
    + "|".join(_any_case(name) for name in SPECIAL_USE_DOMAIN_NAMES)
    + ")\\.?$",
}


def state_rules(spec: dict[str, Any], settings: Settings) -> None:
    """Write the rules into ``spec`` (in place)."""
    schemas = spec["components"]["schemas"]
    _relays(schemas, settings)
    _emails(spec)
    expires = schemas["SuppressionPut"]["properties"]["expires_at"]
    expires["pattern"] = _years_ahead(time.gmtime().tm_year)
    expires["description"] = (
        "When the suppression ends (RFC 3339, with a time zone): in the future, at most 100 "
        "years ahead; none: never.")  # fmt: skip


def _relays(schemas: dict[str, Schema], settings: Settings) -> None:
    ports = sorted(settings.smtp_allow_ports)
    names = ", ".join(str(p) for p in ports)
    for name, server, port, scheme in (
        ("SolutionCreate", "connection_server", "connection_port", "connection_scheme"),
        ("SolutionConfig", "connection_server", "connection_port", "connection_scheme"),
        ("SolutionConfigPatch", "connection_server", "connection_port", "connection_scheme"),
        ("Connection", "server", "port", "scheme"),
    ):
        props = schemas[name]["properties"]
        if settings.smtp_allow_hosts:
            props[port]["description"] = (
                f"{props[port].get('description', '')} Only {names} (POSTROOM_SMTP_ALLOW_PORTS),"
                " unless the relay host is listed in POSTROOM_SMTP_ALLOW_HOSTS.").strip()
            continue
        # the relay's rules hold when there is a relay: a configuration without a server
        # takes any port and scheme (they wait for one; a PATCH is judged with the stored
        # server, which the document cannot see: that refusal is 400 InvalidRelay)
        schemas[name].setdefault("allOf", []).append({"anyOf": [
            {"properties": {server: {"type": "null"}}},
            {"required": [server], "properties": {
                port: {"enum": [*ports, None]},
                scheme: {"enum": [v for v in props[scheme]["enum"] if v != ""]},
            }},
        ]})  # fmt: skip
        props[port]["description"] = (
            f"{props[port].get('description', '')} Only {names} (POSTROOM_SMTP_ALLOW_PORTS) "
            "toward a relay.").strip()
        props[scheme]["description"] = (
            '"smtp" (STARTTLS) or "smtps" (implicit TLS); plain text ("") only toward hosts '
            "listed in POSTROOM_SMTP_ALLOW_HOSTS (none here).")


def _emails(node: Any) -> None:
    """Every ``format: email`` schema refuses the special-use domains."""
    if isinstance(node, dict):
        if node.get("format") == "email":
            node["not"] = SPECIAL_USE
        for value in node.values():
            _emails(value)
    elif isinstance(node, list):
        for value in node:
            _emails(value)


def _years_ahead(year: int) -> str:
    """A pattern for an RFC 3339 date-time whose year is ``year + 1`` to ``year + 99``."""
    years = "|".join(str(y) for y in range(year + 1, year + 100))
    return f"^(?:{years})-"
