"""Bad requests through the real app and a real Redis: each answers a clear error body —
its status, its ``type``, the field it names (where one applies) — and enqueues nothing."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis
from flask.testing import FlaskClient

from postroom.api.app import create_app
from tests.helpers import ADMIN, auth, make_settings, queue_length

MAX_BODY = 256 * 1024
SEND = "/api/v1/solutions/acme/email"
OK = {"to": ["ann@example.com"], "text": "hello"}
RELAY = {"server": "93.184.216.34", "port": 587}
ABSENT = object()


@dataclass(frozen=True)
class Bad:
    """One bad request and what it must answer."""

    name: str
    status: int
    type: str
    field: str | None = None  # the dotted path named in ``fields``
    json: Any = ABSENT  # a body sent as JSON ...
    raw: bytes | None = None  # ... or these bytes
    content_type: str | None = "application/json"
    path: str = SEND
    method: str = "post"
    query: str = ""
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    token: str = "acme"  # "acme", "admin", "none", "wrong"


def send(name: str, body: Any, status: int = 400, type_: str = "ValidationError",
         field_: str | None = None, **kw: Any) -> Bad:
    return Bad(name, status, type_, field_, json=body, **kw)


def relay(name: str, server: str, port: int = 587) -> Bad:
    return send(name, {**OK, "connection": {"server": server, "port": port}}, 400,
                "InvalidRelay")


def raw(name: str, data: bytes, status: int = 400, type_: str = "ValidationError",
        **kw: Any) -> Bad:
    return Bad(name, status, type_, raw=data, **kw)


def conn(**fields: Any) -> dict[str, Any]:
    return {**OK, "connection": {**RELAY, **fields}}


CASES: list[Bad] = [
    # the body as a whole
    raw("text/plain", b'{"to": ["a@example.com"]}', 415, "UnsupportedMediaType",
        content_type="text/plain"),
    raw("form", b"to=a@example.com", 415, "UnsupportedMediaType",
        content_type="application/x-www-form-urlencoded"),
    raw("no content type", b'{"to": ["a@example.com"]}', 415, "UnsupportedMediaType",
        content_type=None),
    raw("xml", b"<to>a@example.com</to>", 415, "UnsupportedMediaType",
        content_type="application/xml"),
    raw("json-ish type", b"{}", 415, "UnsupportedMediaType",
        content_type="application/merge-patch+json"),
    raw("too large", json.dumps({**OK, "text": "x" * MAX_BODY}).encode(), 413, "PayloadTooLarge"),
    raw("invalid utf-8", b'{"to": ["a@example.com"], "text": "\xff\xfe"}'),
    raw("utf-16", '{"to": ["a@example.com"]}'.encode("utf-16")),
    raw("NaN", b'{"to": ["a@example.com"], "hLimit": NaN}'),
    raw("Infinity", b'{"to": ["a@example.com"], "hLimit": Infinity}'),
    raw("-Infinity", b'{"to": ["a@example.com"], "hLimit": -Infinity}'),
    raw("top-level array", b'[{"to": ["a@example.com"]}]'),
    raw("top-level string", b'"to"'),
    raw("top-level number", b"42"),
    raw("top-level null", b"null"),
    raw("100k-deep array", b"[" * 100_000 + b"]" * 100_000),
    raw("deep object", b'{"to": ["a@example.com"], "x": ' + b'{"a": ' * 40 + b"1" + b"}" * 41),
    raw("truncated", b'{"to": ["a@example.com"]'),
    raw("empty", b""),
    raw("5000-digit integer", b'{"to": ["a@example.com"], "hLimit": ' + b"9" * 5000 + b"}"),
    raw("trailing garbage", b'{"to": ["a@example.com"]} x'),
    # fields
    send("unknown field", {**OK, "bogus": 1}, field_="bogus"),
    send("no recipient", {"text": "x"}, field_="to"),
    send("empty to", {"to": []}, field_="to"),
    send("to is a string", {"to": "a@example.com"}, field_="to"),
    send("not an address", {"to": ["not-an-address"]}, field_="to"),
    send("display name", {"to": ["Ann <ann@example.com>"]}, field_="to"),
    send("quoted local part", {"to": ['"a b"@example.com']}, field_="to"),
    send("domain literal", {"to": ["a@[127.0.0.1]"]}, field_="to"),
    send("CRLF in an address", {"to": ["a@example.com\r\nBcc: x@example.com"]}, field_="to"),
    send("homograph domain", {"to": ["a@p\u0430ypal.com"]}, field_="to"),
    send("non-ASCII local part", {"to": ["j\u00f6rg@example.com"]}, field_="to"),
    send("bad cc", {**OK, "cc": ["nope"]}, field_="cc"),
    send("bad bcc", {**OK, "bcc": ["x@"]}, field_="bcc"),
    send("51 recipients", {"to": [f"u{i}@example.com" for i in range(51)]}, field_="to"),
    send("50 + 1 in bcc", {"to": [f"u{i}@example.com" for i in range(50)],
                           "bcc": ["b@example.com"]}, field_="bcc"),
    send("subject CRLF", {**OK, "subject": "Hi\r\nBcc: x@example.com"}, field_="subject"),
    send("subject LF", {**OK, "subject": "Hi\nX-Injected: 1"}, field_="subject"),
    send("subject encoded-word", {**OK, "subject": "=?UTF-8?Q?=0D=0A?=Bcc: x"}, field_="subject"),
    send("subject U+2028", {**OK, "subject": "a\u2028b"}, field_="subject"),
    send("subject U+0085", {**OK, "subject": "a\u0085b"}, field_="subject"),
    send("subject too long", {**OK, "subject": "x" * 999}, field_="subject"),
    send("subject lone surrogate", {**OK, "subject": "a\ud800b"}, field_="subject"),
    send("subject not a string", {**OK, "subject": ["x"]}, field_="subject"),
    send("NUL in text", {**OK, "text": "a\x00b"}, field_="text"),
    send("ESC in html", {**OK, "html": "<p>\x1b[31m</p>"}, field_="html"),
    send("from on the default relay", {**OK, "from": "me@example.com"}, field_="from"),
    send("from with a display name", {**conn(), "from": "Me <me@example.com>"}, field_="from"),
    send("hLimit string", {**OK, "hLimit": "10"}, field_="hLimit"),
    send("hLimit float", {**OK, "hLimit": 10.5}, field_="hLimit"),
    send("hLimit bool", {**OK, "hLimit": True}, field_="hLimit"),
    send("hLimit negative", {**OK, "hLimit": -1}, field_="hLimit"),
    send("port string", conn(port="25"), field_="connection.port"),
    send("port zero", conn(port=0), field_="connection.port"),
    send("port too big", conn(port=65536), field_="connection.port"),
    send("unknown scheme", conn(scheme="tls"), field_="connection.scheme"),
    send("plain text to a public relay", conn(scheme=""), field_="connection.scheme"),
    send("user with a space", conn(user="a b"), field_="connection.user"),
    send("user with LF", conn(user="me\n"), field_="connection.user"),
    send("password with CRLF", conn(password="pw\r\nQUIT"), field_="connection.password"),
    send("server with LF", conn(server="smtp.example.com\nX"), field_="connection.server"),
    send("server in brackets", conn(server="[::1]"), field_="connection.server"),
    send("server missing", {**OK, "connection": {"port": 587}}, field_="connection.server"),
    send("unknown connection field", conn(tls=True), field_="connection.tls"),
    send("connection not an object", {**OK, "connection": "smtp://x"}, field_="connection"),
    # caller-chosen relays that point inside (SSRF)
    relay("loopback", "127.0.0.1"),
    relay("short loopback", "127.1"),
    relay("decimal loopback", "2130706433"),
    relay("hex loopback", "0x7f.1"),
    relay("IPv6 loopback", "::1"),
    relay("IPv4-mapped loopback", "::ffff:127.0.0.1"),
    relay("unspecified", "0.0.0.0"),
    relay("private", "10.0.0.1"),
    relay("metadata", "169.254.169.254"),
    relay("CGNAT", "100.64.0.1"),
    relay("localhost", "localhost"),
    relay("Redis port on a public address", "93.184.216.34", 6379),
    # query and headers
    send("wait zero", OK, field_="wait", query="?wait=0"),
    send("wait words", OK, field_="wait", query="?wait=soon"),
    send("wait too long", OK, field_="wait", query="?wait=31"),
    send("Idempotency-Key too long", OK, field_="Idempotency-Key",
         headers={"Idempotency-Key": "k" * 256}),
    send("Idempotency-Key reused with another body", {**OK, "text": "other"}, 422,
         "IdempotencyMismatch", headers={"Idempotency-Key": "used"}),
    # who may send where
    send("no token", OK, 401, "Unauthorized", token="none"),
    send("wrong token", OK, 401, "Unauthorized", token="wrong"),
    # the token and the solution are judged before the body, though the body is read first
    send("wrong token, bad body", {"to": ["not an address"]}, 401, "Unauthorized",
         token="wrong"),
    send("wrong token, bad wait", OK, 401, "Unauthorized", token="wrong", query="?wait=0"),
    send("wrong token, Idempotency-Key", OK, 401, "Unauthorized", token="wrong",
         headers={"Idempotency-Key": "fresh"}),
    send("another solution, bad body", {"to": []}, 404, "NotFound",
         path="/api/v1/solutions/other/email"),
    send("no such solution, bad body", {"text": "x"}, 404, "NotFound",
         path="/api/v1/solutions/nope/email", token="admin"),
    send("another solution", OK, 404, "NotFound", path="/api/v1/solutions/other/email"),
    send("no such solution", OK, 404, "NotFound", path="/api/v1/solutions/nope/email",
         token="admin"),
    send("suppressed recipient", {"to": ["Blocked@Example.com"]}, 429, "Blocked"),
    send("hLimit 0", OK, 429, "RateLimited", path="/api/v1/solutions/frozen/email",
         token="admin"),
    Bad("GET on send", 405, "MethodNotAllowed", method="get", content_type=None),
    # other routes' bodies
    send("config: plain text to a public relay",
         {"connection_server": "93.184.216.34", "connection_scheme": ""},
         field_="connection_scheme", path="/api/v1/solutions/acme/config", method="put"),
    send("config: relay on loopback", {"connection_server": "127.0.0.1"}, 400, "InvalidRelay",
         path="/api/v1/solutions/acme/config", method="patch"),
    send("config: a solution raising its hLimit", {"hLimit": 1000}, 403, "Forbidden",
         path="/api/v1/solutions/acme/config", method="patch"),
    send("config: port float", {"connection_port": 25.5}, field_="connection_port",
         path="/api/v1/solutions/acme/config", method="put"),
    send("suppression: unknown reason", {"reason": "spam"}, field_="reason",
         path="/api/v1/solutions/acme/suppressions/a@example.com", method="put"),
    send("suppression: bad address", {}, field_="email",
         path="/api/v1/solutions/acme/suppressions/a@b@example.com", method="put"),
    send("event: unknown type", {"type": "open", "email": "a@example.com"}, field_="type",
         path="/api/v1/solutions/acme/events"),
]


@dataclass
class World:
    client: FlaskClient
    redis: redis.Redis
    tokens: dict[str, str]


@pytest.fixture(scope="module")
def world(redis_url: str) -> Iterator[World]:
    """One app and its solutions for the whole table: ``acme`` (one send already queued
    under Idempotency-Key ``used``; blocked@example.com suppressed), ``other``, and
    ``frozen`` (hLimit 0)."""
    client_redis = redis.Redis.from_url(redis_url)
    client_redis.flushdb()
    client = create_app(make_settings(redis_url, max_body_bytes=MAX_BODY)).test_client()
    tokens = {"admin": ADMIN, "wrong": "pr_not-a-token"}
    for sid, config in (("acme", {}), ("other", {}), ("frozen", {"hLimit": 0})):
        r = client.post("/api/v1/solutions", json={"solution_id": sid, **config},
                        headers=auth(ADMIN))
        assert 201 == r.status_code, r.get_json()
        tokens[sid] = r.get_json()["token"]
    assert 202 == client.post(SEND, json=OK, headers={
        **auth(tokens["acme"]), "Idempotency-Key": "used"}).status_code
    assert 201 == client.put("/api/v1/solutions/acme/suppressions/blocked@example.com",
                             headers=auth(tokens["acme"])).status_code
    yield World(client, client_redis, tokens)
    client_redis.flushdb()
    client_redis.close()


def test_the_table_is_large_enough() -> None:
    """At least 45 distinct bad inputs, each with its own name."""
    assert len(CASES) >= 45
    assert len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(world: World, case: Bad) -> None:
    """The status, ``type`` and named field are the ones expected, the body is the one
    error body, and the broker queue did not grow."""
    headers = dict(case.headers)
    if case.token in world.tokens:
        headers.update(auth(world.tokens[case.token]))
    kwargs: dict[str, Any] = {"headers": headers}
    if case.json is not ABSENT:
        kwargs["json"] = case.json
    elif case.raw is not None:
        kwargs["data"] = case.raw
        if case.content_type is not None:
            kwargs["content_type"] = case.content_type
    before = queue_length(world.redis)
    r = getattr(world.client, case.method)(case.path + case.query, **kwargs)
    body = r.get_json()
    assert (case.status, case.type, case.status) == (r.status_code, body["type"],
                                                     body["status"]), body
    assert isinstance(body["error"], str) and body["error"]
    if case.field is None:
        assert {} == body.get("fields", {})
    else:
        node: Any = body["fields"]
        for part in case.field.split("."):
            assert part in node, body["fields"]
            node = node[part]
        assert isinstance(node, list) and node and all(isinstance(m, str) for m in node)
    assert before == queue_length(world.redis)
