"""Request validation: what each schema refuses (and names), and what it returns."""

from __future__ import annotations

from typing import Any, cast

import marshmallow
import pytest

from postroom.shared import errors
from postroom.shared.schemas import (
    Schemas,
    address_key,
    check_sender,
    email_param,
    load_or_raise,
    make_schemas,
    normalize_address,
)
from postroom.shared.schemas import addresses as addresses_module
from postroom.shared.settings import Settings

OK = {"to": ["someone@example.com"]}
RELAY = {"server": "smtp.example.com"}


@pytest.fixture(scope="module")
def schemas() -> Schemas:
    return make_schemas(Settings())


def _fields(schemas: Schemas, kind: str, body: Any) -> dict[str, Any]:
    with pytest.raises(errors.ValidationError) as caught:
        load_or_raise(getattr(schemas, kind), body)
    body_out = caught.value.body()
    assert body_out["type"] == "ValidationError"
    assert body_out["status"] == 400
    fields: dict[str, Any] = body_out["fields"]
    return fields


def _messages(fields: dict[str, Any], path: str) -> list[str]:
    node: Any = fields
    for part in path.split("."):
        assert isinstance(node, dict) and part in node, f"{path} not in {fields}"
        node = node[part]
    assert isinstance(node, list) and node, f"{path} holds no messages: {node!r}"
    return node


def _recipients(n: int) -> list[str]:
    return [f"user{i}@example.com" for i in range(n)]


# (schema, body, the field named, a part of its message)
BAD: list[tuple[str, Any, str, str]] = [
    # strict integers
    ("send", {**OK, "hLimit": "10"}, "hLimit", "Must be a JSON integer."),
    ("send", {**OK, "hLimit": 10.5}, "hLimit", "Must be a JSON integer."),
    ("send", {**OK, "hLimit": 1e400}, "hLimit", "Must be a JSON integer."),  # inf
    ("send", {**OK, "hLimit": True}, "hLimit", "Must be a JSON integer."),
    ("send", {**OK, "hLimit": -1}, "hLimit", "Must be between 0 and"),
    ("send", {**OK, "hLimit": 10**12}, "hLimit", "Must be between 0 and"),
    ("send", {**OK, "connection": {**RELAY, "port": 25.5}}, "connection.port", "JSON integer"),
    ("send", {**OK, "connection": {**RELAY, "port": "25"}}, "connection.port", "JSON integer"),
    ("send", {**OK, "connection": {**RELAY, "port": False}}, "connection.port", "JSON integer"),
    ("send", {**OK, "connection": {**RELAY, "port": 0}}, "connection.port", "between 1 and 65535"),
    ("send", {**OK, "connection": {**RELAY, "port": 65536}}, "connection.port", "between 1 and"),
    # the connection object
    ("send", {**OK, "connection": {**RELAY, "user": "me\n"}}, "connection.user", "U+000A"),
    ("send", {**OK, "connection": {**RELAY, "user": "me\x7f"}}, "connection.user", "U+007F"),
    ("send", {**OK, "connection": {**RELAY, "user": "a b"}}, "connection.user", "whitespace"),
    ("send", {**OK, "connection": {**RELAY, "user": "a\u00a0b"}}, "connection.user", "whitespace"),
    ("send", {**OK, "connection": {**RELAY, "password": "p\r\n"}}, "connection.password", "U+000D"),
    ("send", {**OK, "connection": {"port": 587}}, "connection.server", "required"),
    ("send", {**OK, "connection": {"server": "smtp.example.com\n"}}, "connection.server", "U+000A"),
    ("send", {**OK, "connection": {"server": "smtp example.com"}}, "connection.server", "host"),
    ("send", {**OK, "connection": {"server": "-x.example.com"}}, "connection.server", "host"),
    ("send", {**OK, "connection": {**RELAY, "scheme": "tls"}}, "connection.scheme", '"smtps"'),
    ("send", {**OK, "connection": {**RELAY, "tls": True}}, "connection.tls", "Unknown field."),
    ("send", {**OK, "connection": "smtp://x"}, "connection", "Must be a JSON object."),
    ("send", {**OK, "replyTo": "a@example.com"}, "replyTo", "Unknown field."),
    # header injection through the subject
    ("send", {**OK, "subject": "hi\r\nBcc: x@example.com"}, "subject", "control characters"),
    ("send", {**OK, "subject": "=?UTF-8?Q?=0D=0A?=Bcc: x"}, "subject", "encoded-words"),
    ("send", {**OK, "subject": "a\u2028b"}, "subject", "U+2028"),
    ("send", {**OK, "subject": "a\u2029b"}, "subject", "U+2029"),
    ("send", {**OK, "subject": "a\u0085b"}, "subject", "U+0085"),
    ("send", {**OK, "subject": "a\ud800b"}, "subject", "U+D800"),
    ("send", {**OK, "subject": "x" * 999}, "subject", "At most 998 characters."),
    ("send", {**OK, "subject": 5}, "subject", "Must be a string."),
    ("send", {**OK, "text": "a\x00b"}, "text", "U+0000"),
    ("send", {**OK, "html": "\x1b[31mred"}, "html", "U+001B"),
    # recipients
    ("send", {}, "to", "At least one recipient"),
    ("send", {"to": [], "cc": [], "bcc": []}, "to", "At least one recipient"),
    ("send", {"to": None, "cc": None}, "to", "At least one recipient"),
    ("send", {"to": "someone@example.com"}, "to", "Must be a list of email addresses."),
    ("send", {"to": [5]}, "to", "Item 0: Must be a string."),
    ("send", {"to": ["A <a@example.com>"]}, "to", "display name"),
    ("send", {"to": ['"a b"@example.com']}, "to", "Quoting"),
    ("send", {"to": ["a@[127.0.0.1]"]}, "to", "bracketed IP address"),
    ("send", {"to": ["a@example.com\n"]}, "to", "U+000A"),
    ("send", {"to": [" a@example.com"]}, "to", "invalid characters"),
    ("send", {"to": ["a@p\u0430ypal.com"]}, "to", "mixes letters of different scripts"),
    ("send", {"to": ["a@xn--pypal-4ve.com"]}, "to", "mixes letters of different scripts"),
    ("send", {"to": ["\u00fc@example.com"]}, "to", "Internationalized characters"),
    ("send", {"to": ["a@localhost"]}, "to", "Not a valid email address"),
    ("send", {"to": _recipients(51)}, "to", "At most 50 recipients in to, cc and bcc together."),
    ("send", {"to": _recipients(30), "bcc": _recipients(21)}, "bcc", "At most 50 recipients"),
    ("send", {"to": ["ok@example.com", "nope"]}, "to", "Item 1: Not a valid email address"),
    ("send", {"cc": ["nope"]}, "cc", "Item 0: Not a valid email address"),
    ("send", {**OK, "from": "nope"}, "from", "Not a valid email address"),
    ("send", {**OK, "from": "Me <me@example.com>"}, "from", "display name"),
    # solution configuration
    ("config_put", {"connection_port": "587"}, "connection_port", "Must be a JSON integer."),
    ("config_put", {"hLimit": True}, "hLimit", "Must be a JSON integer."),
    ("config_put", {"hLimit": 2.5}, "hLimit", "Must be a JSON integer."),
    ("config_put", {"hLimit_policy": "queue"}, "hLimit_policy", '"reject" or "defer"'),
    ("config_put", {"connection_scheme": "starttls"}, "connection_scheme", '"smtp"'),
    ("config_put", {"connection_user": "me\n"}, "connection_user", "U+000A"),
    ("config_put", {"connection_server": "a_b..c"}, "connection_server", "host name"),
    ("config_put", {"hlimit": 5}, "hlimit", "Unknown field."),
    ("config_patch", {"connection_port": 70000}, "connection_port", "between 1 and 65535"),
    ("config_patch", {"connection_password": "p\x00"}, "connection_password", "U+0000"),
    ("create", {}, "solution_id", "required"),
    ("create", {"solution_id": "Abc"}, "solution_id", "lower-case"),
    ("create", {"solution_id": "abc\n"}, "solution_id", "lower-case"),
    ("create", {"solution_id": "{abc}:x"}, "solution_id", "lower-case"),
    ("create", {"solution_id": "a" * 64}, "solution_id", "1 to 63 characters"),
    ("create", {"solution_id": "-abc"}, "solution_id", "starting with"),
    ("create", {"solution_id": 7}, "solution_id", "Must be a string."),
    ("create", {"solution_id": "abc", "token": "x"}, "token", "Unknown field."),
    # suppressions and events
    ("event", {"type": "open", "email": "a@example.com"}, "type", '"bounce" or "complaint"'),
    ("event", {"type": "bounce", "email": "nope"}, "email", "Not a valid email address"),
    ("event", {"type": "bounce"}, "email", "required"),
    ("suppression", {"reason": "spam"}, "reason", '"manual"'),
]


@pytest.mark.parametrize(("kind", "body", "path", "message"), BAD)
def test_bad_input_names_the_field(
    schemas: Schemas, kind: str, body: Any, path: str, message: str
) -> None:
    """Each bad input is a 400 whose ``fields`` names the bad field (nested as in the
    request, under its JSON name) with a message that says what is wrong."""
    fields = _fields(schemas, kind, body)
    messages = _messages(fields, path)
    assert any(message in m for m in messages), messages


def test_at_least_forty_bad_inputs() -> None:
    """The table above stays broad."""
    assert len(BAD) >= 40


def test_error_body_summary_and_nesting(schemas: Schemas) -> None:
    """The error body is ``{type, error, status, fields}``: ``error`` is one line naming
    every bad field by its dotted path, ``fields`` nests like the request."""
    body = {"to": [], "connection": {"server": "smtp.example.com", "port": "25"}}
    with pytest.raises(errors.ValidationError) as caught:
        load_or_raise(schemas.send, body)
    assert caught.value.body() == {
        "type": "ValidationError",
        "error": "invalid fields: connection.port, to",
        "status": 400,
        "fields": {
            "connection": {"port": ["Must be a JSON integer."]},
            "to": ["At least one recipient is required in to, cc or bcc."],
        },
    }


def test_body_that_is_not_an_object(schemas: Schemas) -> None:
    """A JSON array or scalar as the body is a 400 that says so."""
    bodies: list[Any] = [[], "x", 5, None]
    for body in bodies:
        with pytest.raises(errors.ValidationError) as caught:
            load_or_raise(schemas.send, body)
        assert caught.value.body()["error"] == "The request body must be a JSON object."


def test_unknown_keys_are_clipped_in_the_error(schemas: Schemas) -> None:
    """Unknown keys are echoed back clipped and without control characters, and the
    summary names at most ten fields."""
    body = {**OK, **{f"k{i}": 1 for i in range(11)}, "x" * 5000: 1, "a\r\nb": 1}
    with pytest.raises(errors.ValidationError) as caught:
        load_or_raise(schemas.send, body)
    assert caught.value.message.endswith(" and 3 more")
    keys = caught.value.extra["fields"]
    assert all(len(key) <= 67 for key in keys)
    assert "a\ufffd\ufffdb" in keys


def test_all_errors_reported_at_once(schemas: Schemas) -> None:
    """Several bad fields in one request are all named in one answer."""
    body = {"to": ["nope"], "subject": "a\nb", "hLimit": "1", "x": 1, "connection": {}}
    fields = _fields(schemas, "send", body)
    assert sorted(fields) == ["connection", "hLimit", "subject", "to", "x"]
    assert fields["connection"] == {"server": ["This field is required."]}


# -- good inputs ------------------------------------------------------------------------


def test_loaded_send_request_shape(schemas: Schemas) -> None:
    """A loaded request holds every key under its JSON name; absent and null are alike;
    addresses come back normalized (domain lower-cased, local part kept)."""
    loaded = load_or_raise(schemas.send, {"to": ["Someone@EXAMPLE.com"], "cc": None})
    assert loaded == {
        "to": ["Someone@example.com"],
        "cc": [],
        "bcc": [],
        "from": None,
        "subject": None,
        "text": None,
        "html": None,
        "hLimit": None,
        "connection": None,
        "reply_to": [],
        "headers": {},
        "attachments": [],
        "template": None,
        "template_data": {},
        "send_at": None,
        "metadata": {},
    }


def test_full_send_request(schemas: Schemas) -> None:
    """Every field given: values come back as given, normalized where said."""
    body = {
        "to": ["a@example.com"],
        "cc": ["b@example.com"],
        "bcc": ["c@example.com"],
        "from": "Me@Example.ORG",
        "subject": "Grüße ✓ " + "x" * 990,
        "text": "line 1\r\nline 2\n\tindented\f",
        "html": "<p>hi</p>\n",
        "hLimit": 0,
        "connection": {
            "server": "SMTP.Example.com",
            "port": 2525,
            "user": "me@example.org",
            "password": "pass word",
            "scheme": "smtps",
        },
        "metadata": {"order": "A-17", "k" * 40: "v" * 256},
    }
    loaded = load_or_raise(schemas.send, body)
    assert loaded == {
        **body,
        "from": "Me@example.org",
        "connection": {**cast(dict[str, Any], body["connection"]),
                       "server": "smtp.example.com"},
        "reply_to": [], "headers": {}, "attachments": [], "template": None,
        "template_data": {}, "send_at": None,
    }
    assert len(loaded["subject"]) == 998


def test_integral_numbers_are_integers(schemas: Schemas) -> None:
    """A number with a zero fractional part is an integer, as JSON Schema says: ``10.0``
    loads as ``10`` (an int), in a send, a nested connection and a configuration."""
    loaded = load_or_raise(
        schemas.send, {**OK, "hLimit": 10.0, "connection": {**RELAY, "port": 2525.0}}
    )
    assert (10, int) == (loaded["hLimit"], type(loaded["hLimit"]))
    assert (2525, int) == (loaded["connection"]["port"], type(loaded["connection"]["port"]))
    config = load_or_raise(schemas.config_put, {"hLimit": 3.0})
    assert (3, int) == (config["hLimit"], type(config["hLimit"]))


@pytest.mark.parametrize(
    ("connection", "scheme", "port"),
    [
        ({}, "smtp", 587),
        ({"scheme": None, "port": None}, "smtp", 587),
        ({"scheme": "smtp"}, "smtp", 587),
        ({"scheme": "smtps"}, "smtps", 465),
        ({"scheme": ""}, "", 25),
        ({"scheme": "smtps", "port": 2525}, "smtps", 2525),
    ],
)
def test_default_port_by_scheme(
    schemas: Schemas, connection: dict[str, Any], scheme: str, port: int
) -> None:
    """``connection.scheme`` defaults to smtp; the port to 587, 465 or 25 by scheme."""
    loaded = load_or_raise(schemas.send, {**OK, "connection": {**RELAY, **connection}})
    assert loaded["connection"] == {
        "server": "smtp.example.com",
        "port": port,
        "user": None,
        "password": None,
        "scheme": scheme,
    }


@pytest.mark.parametrize(
    ("address", "normalized"),
    [
        ("someone@example.com", "someone@example.com"),
        ("Some.One+tag@Example.COM", "Some.One+tag@example.com"),
        ("a@m\u00fcnchen.de", "a@xn--mnchen-3ya.de"),  # IDN: the xn-- form
        ("a@xn--mnchen-3ya.de", "a@xn--mnchen-3ya.de"),
        ("a@\uff45xample.com", "a@example.com"),  # fullwidth letters are mapped
        ("a@\u4f8b\u3048.\u30c6\u30b9\u30c8", "a@xn--r8jz45g.xn--zckzah"),  # Han + Hiragana
        ("a@\u4e2d\u56fdabc.cn", "a@xn--abc-u68dy61b.cn"),  # Han + Latin
        ("a@\u0440\u043e\u0441\u0441\u0438\u044f.\u0440\u0444", "a@xn--h1alffa9f.xn--p1ai"),
        ("a@\u03b5\u03bb\u03bb\u03ac\u03b4\u03b1.gr", "a@xn--hxakic4aa.gr"),
        ("a@\ud55c\uad6d\uc5b4.kr", "a@xn--3e0bk47br7k.kr"),
    ],
)
def test_address_normalization(address: str, normalized: str) -> None:
    """Addresses come back in email-validator's normalized form with an ASCII (xn--)
    domain; single-script and CJK-combination labels are fine."""
    assert normalize_address(address) == normalized


@pytest.mark.parametrize(
    "address",
    [
        "a@p\u0430ypal.com",  # Latin + Cyrillic
        "a@\u03b1\u03b2cd.com",  # Greek + Latin
        "a@\u0430pple.example.com",  # Cyrillic + Latin in a subdomain
        "a@\ud55c\uad6d\u0430.kr",  # Hangul + Cyrillic
    ],
)
def test_mixed_script_domains_refused(address: str) -> None:
    """A domain label mixing scripts (a homograph of another domain) is refused."""
    with pytest.raises(marshmallow.ValidationError, match="mixes letters of different scripts"):
        normalize_address(address)


def test_address_key_compares_case_insensitively() -> None:
    """Two spellings of one address share a key (suppressions compare by it)."""
    assert address_key(normalize_address("Someone@EXAMPLE.com")) == address_key(
        normalize_address("someone@example.com")
    )


def test_recipient_limit_counts_all_fields(schemas: Schemas) -> None:
    """Fifty recipients across to, cc and bcc pass; the limit comes from settings."""
    body = {"to": _recipients(20), "cc": _recipients(20), "bcc": _recipients(10)}
    assert len(load_or_raise(schemas.send, body)["bcc"]) == 10
    small = make_schemas(Settings(max_recipients=2))
    fields = _fields(small, "send", {"to": _recipients(2), "cc": _recipients(1)})
    assert fields == {"cc": ["At most 2 recipients in to, cc and bcc together."]}


def test_cc_or_bcc_alone_is_enough(schemas: Schemas) -> None:
    """A message may go to cc or bcc only."""
    assert load_or_raise(schemas.send, {"bcc": ["a@example.com"]})["to"] == []


def test_check_dns_setting_reaches_the_validator(monkeypatch: pytest.MonkeyPatch) -> None:
    """``check_dns`` in settings turns deliverability checks on; off by default."""
    seen: list[bool] = []
    validated = addresses_module._validated

    def recording(value: str, *, check_dns: bool) -> Any:
        seen.append(check_dns)
        return validated(value, check_dns=False)  # no DNS in tests

    monkeypatch.setattr(addresses_module, "_validated", recording)
    addresses_module._normalize_cached.cache_clear()
    addresses_module._plain_domain.cache_clear()
    load_or_raise(make_schemas(Settings(check_dns=True)).send, {"to": ["x1@example.com"]})
    load_or_raise(make_schemas(Settings()).send, {"to": ["x2@example.com"]})
    addresses_module._normalize_cached.cache_clear()
    addresses_module._plain_domain.cache_clear()
    assert seen == [True, False]


def test_check_sender() -> None:
    """``from`` needs the caller's own relay: a connection, or connection_server."""
    with_from = {"from": "me@example.org", "connection": None}
    with pytest.raises(errors.ValidationError) as caught:
        check_sender(with_from, {"connection_server": None})
    assert list(caught.value.extra["fields"]) == ["from"]
    assert caught.value.message == "invalid fields: from"
    check_sender(with_from, {"connection_server": "smtp.example.org"})
    check_sender({**with_from, "connection": {"server": "smtp.example.org"}}, {})
    check_sender({"from": None, "connection": None}, {})


def test_put_fills_defaults() -> None:
    """PUT replaces the whole configuration: omitted or null fields take their defaults,
    ``hLimit``'s from settings."""
    schemas = make_schemas(Settings(hlimit_default=25))
    loaded = load_or_raise(schemas.config_put, {"connection_server": "SMTP.x.org", "hLimit": None})
    assert loaded == {
        "connection_server": "smtp.x.org",
        "connection_user": None,
        "connection_password": None,
        "connection_port": None,
        "connection_scheme": "smtp",
        "hLimit": 25,
        "hLimit_policy": "reject",
    }


def test_patch_null_clears_and_omitted_stay(schemas: Schemas) -> None:
    """PATCH returns only the given fields; null puts one back to its default."""
    body = {
        "hLimit": None,
        "connection_server": None,
        "connection_scheme": None,
        "hLimit_policy": "defer",
    }
    assert load_or_raise(schemas.config_patch, body) == {
        "hLimit": 10,
        "connection_server": None,
        "connection_scheme": "smtp",
        "hLimit_policy": "defer",
    }
    assert load_or_raise(schemas.config_patch, {}) == {}
    assert load_or_raise(schemas.config_patch, {"connection_port": 465}) == {"connection_port": 465}


def test_create_solution(schemas: Schemas) -> None:
    """Create takes ``solution_id`` and a configuration with defaults."""
    loaded = load_or_raise(schemas.create, {"solution_id": "demo_1-a", "hLimit": 3})
    assert loaded["solution_id"] == "demo_1-a"
    assert loaded["hLimit"] == 3
    assert loaded["hLimit_policy"] == "reject"


def test_event_and_suppression(schemas: Schemas) -> None:
    """An event's address is normalized; a suppression's reason defaults to manual."""
    event = load_or_raise(schemas.event, {"type": "complaint", "email": "A@Example.com"})
    assert event == {"type": "complaint", "email": "A@example.com", "detail": None}
    assert load_or_raise(schemas.suppression, {}) == {"reason": "manual"}


def test_email_path_parameter() -> None:
    """A path's ``{email}`` is normalized, or a 400 naming ``email``."""
    assert email_param("A@EXAMPLE.com") == "A@example.com"
    with pytest.raises(errors.ValidationError) as caught:
        email_param("nope")
    assert list(caught.value.extra["fields"]) == ["email"]


def test_schemas_are_reusable(schemas: Schemas) -> None:
    """One schema instance serves request after request (no state kept between loads)."""
    first = load_or_raise(schemas.send, {**OK, "connection": RELAY})
    _fields(schemas, "send", {"to": []})
    assert load_or_raise(schemas.send, {**OK, "connection": RELAY}) == first
