"""Bad inputs for the richer fields (reply_to, headers, attachments, template, send_at)
and the template and cancel routes, through the real app and a real Redis: each answers
its status, ``type`` and the field it names, and nothing is queued, scheduled or stored."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis
from flask.testing import FlaskClient

from postroom.api.app import create_app
from postroom.shared import keys
from tests.helpers import ADMIN, auth, make_settings, queue_length

SEND = "/api/v1/solutions/acme/email"
OK = {"to": ["ann@example.com"], "text": "hello"}
PDF = base64.b64encode(b"%PDF-1.4 tiny").decode()
LIMIT = 1024  # POSTROOM_MAX_ATTACHMENT_BYTES in this module


def att(**fields: Any) -> dict[str, Any]:
    return {"filename": "a.pdf", "content": PDF, **fields}


def with_att(*items: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {**OK, "attachments": list(items), **extra}


def later(**delta: float) -> str:
    return (datetime.now(UTC) + timedelta(**delta)).isoformat()


@dataclass(frozen=True)
class Bad:
    name: str
    body: Any
    field: str | None  # the dotted path named in ``fields``
    status: int = 400
    type: str = "ValidationError"
    path: str = SEND
    method: str = "post"


CASES: list[Bad] = [
    # reply_to
    Bad("reply_to not a list", {**OK, "reply_to": "r@example.com"}, "reply_to"),
    Bad("reply_to bad address", {**OK, "reply_to": ["not an address"]}, "reply_to"),
    Bad("reply_to display name", {**OK, "reply_to": ["R <r@example.com>"]}, "reply_to"),
    Bad("reply_to over 5", {**OK, "reply_to": [f"r{i}@example.com" for i in range(6)]},
        "reply_to"),
    Bad("reply_to with CRLF", {**OK, "reply_to": ["r@example.com\r\nBcc: x@example.com"]},
        "reply_to"),
    # headers
    Bad("headers not an object", {**OK, "headers": ["X-A: b"]}, "headers"),
    Bad("header name not allowed", {**OK, "headers": {"Bcc": "x@example.com"}}, "headers"),
    Bad("header Subject refused", {**OK, "headers": {"Subject": "again"}}, "headers"),
    Bad("header name with colon", {**OK, "headers": {"X-A:b": "c"}}, "headers"),
    Bad("header name with space", {**OK, "headers": {"X-A b": "c"}}, "headers"),
    Bad("header value CRLF", {**OK, "headers": {"X-A": "v\r\nBcc: x@example.com"}}, "headers"),
    Bad("header value LF", {**OK, "headers": {"X-A": "v\nBcc: x@example.com"}}, "headers"),
    Bad("header value U+2028", {**OK, "headers": {"X-A": "v\u2028w"}}, "headers"),
    Bad("header value encoded-word", {**OK, "headers": {"X-A": "=?UTF-8?Q?=0D=0A?=Bcc: x"}},
        "headers"),
    Bad("header value non-ASCII", {**OK, "headers": {"X-A": "Grüße"}}, "headers"),
    Bad("header value not a string", {**OK, "headers": {"X-A": 5}}, "headers"),
    Bad("header value too long", {**OK, "headers": {"X-A": "v" * 901}}, "headers"),
    Bad("header given twice", {**OK, "headers": {"X-A": "1", "x-a": "2"}}, "headers"),
    Bad("too many headers", {**OK, "headers": {f"X-H{i}": "v" for i in range(21)}}, "headers"),
    Bad("unsubscribe not a URI list", {**OK, "headers": {
        "List-Unsubscribe": "https://example.com/u"}}, "headers"),
    Bad("unsubscribe javascript", {**OK, "headers": {
        "List-Unsubscribe": "<javascript:alert(1)>"}}, "headers"),
    Bad("one-click without unsubscribe", {**OK, "headers": {
        "List-Unsubscribe-Post": "List-Unsubscribe=One-Click"}}, "headers"),
    Bad("one-click with mailto only", {**OK, "headers": {
        "List-Unsubscribe": "<mailto:u@example.com>",
        "List-Unsubscribe-Post": "List-Unsubscribe=One-Click"}}, "headers"),
    Bad("one-click with http", {**OK, "headers": {
        "List-Unsubscribe": "<http://example.com/u>",
        "List-Unsubscribe-Post": "List-Unsubscribe=One-Click"}}, "headers"),
    Bad("one-click other value", {**OK, "headers": {
        "List-Unsubscribe": "<https://example.com/u>",
        "List-Unsubscribe-Post": "One-Click"}}, "headers"),
    # attachments
    Bad("attachments not a list", {**OK, "attachments": {"filename": "a"}}, "attachments"),
    Bad("attachment bad base64", with_att(att(content="not base64!")), "attachments"),
    Bad("attachment unpadded base64", with_att(att(content="YWJj" + "ZA")), "attachments"),
    Bad("attachment content not a string", with_att(att(content=5)), "attachments"),
    Bad("attachment without content", with_att({"filename": "a.pdf"}), "attachments"),
    Bad("attachment empty filename", with_att(att(filename="")), "attachments"),
    Bad("attachment filename too long", with_att(att(filename="a" * 252 + ".pdf")),
        "attachments"),
    Bad("attachment path", with_att(att(filename="../../etc/passwd")), "attachments"),
    Bad("attachment windows path", with_att(att(filename="C:\\x\\a.pdf")), "attachments"),
    Bad("attachment dot dot", with_att(att(filename="..")), "attachments"),
    Bad("attachment CR in filename", with_att(att(filename="a\r\n.pdf")), "attachments"),
    Bad("attachment exe", with_att(att(filename="setup.exe")), "attachments"),
    Bad("attachment EXE upper case", with_att(att(filename="SETUP.EXE")), "attachments"),
    Bad("attachment js trailing dot", with_att(att(filename="run.js.")), "attachments"),
    Bad("attachment jar", with_att(att(filename="app.jar")), "attachments"),
    Bad("attachment executable type", with_att(att(filename="x.bin",
        content_type="application/x-msdownload")), "attachments"),
    Bad("attachment content type malformed", with_att(att(content_type="pdf")),
        "attachments"),
    Bad("attachment unknown field", with_att(att(path="/etc/passwd")), "attachments"),
    Bad("content_id not referenced", with_att(att(content_id="logo"),
        html="<p>no image</p>"), "attachments"),
    Bad("content_id without html", with_att(att(content_id="logo")), "attachments"),
    Bad("content_id with brackets", with_att(att(content_id="<logo>"),
        html='<img src="cid:<logo>">'), "attachments"),
    Bad("content_id twice", with_att(att(content_id="l"), att(content_id="l"),
        html='<img src="cid:l">'), "attachments"),
    Bad("attachments over the limit", with_att(att(content=base64.b64encode(
        b"x" * (LIMIT + 1)).decode())), "attachments"),
    Bad("too many attachments", with_att(*[att() for _ in range(21)]), "attachments"),
    # template
    Bad("template with subject", {"to": ["a@example.com"], "template": "welcome",
        "subject": "s"}, "template"),
    Bad("template with text", {"to": ["a@example.com"], "template": "welcome",
        "text": "t"}, "template"),
    Bad("template unknown", {"to": ["a@example.com"], "template": "nope"}, "template"),
    Bad("template bad name", {"to": ["a@example.com"], "template": "../x"}, "template"),
    Bad("template_data without template", {**OK, "template_data": {"a": 1}},
        "template_data"),
    Bad("template_data not an object", {"to": ["a@example.com"], "template": "welcome",
        "template_data": [1]}, "template_data"),
    Bad("template_data missing a variable", {"to": ["a@example.com"],
        "template": "welcome", "template_data": {}}, "template_data"),
    Bad("template renders a CRLF subject", {"to": ["a@example.com"], "template": "welcome",
        "template_data": {"name": "x\r\nBcc: y@example.com"}}, "template_data"),
    Bad("template renders an encoded-word", {"to": ["a@example.com"], "template": "welcome",
        "template_data": {"name": "=?UTF-8?Q?=0D=0A?="}}, "template_data"),
    Bad("template renders a long subject", {"to": ["a@example.com"], "template": "welcome",
        "template_data": {"name": "x" * 1000}}, "template_data"),
    Bad("template sandbox escape", {"to": ["a@example.com"], "template": "escape"},
        "template_data"),
    # send_at
    Bad("send_at not a string", {**OK, "send_at": 1700000000}, "send_at"),
    Bad("send_at without offset", {**OK, "send_at": "2030-01-01T09:00:00"}, "send_at"),
    Bad("send_at a date", {**OK, "send_at": "2030-01-01"}, "send_at"),
    Bad("send_at not a date", {**OK, "send_at": "2030-02-30T09:00:00Z"}, "send_at"),
    Bad("send_at over 30 days", {**OK, "send_at": later(days=31)}, "send_at"),
    # the template routes
    Bad("put template without subject", {"text": "t"}, "subject", method="put",
        path="/api/v1/solutions/acme/templates/t1"),
    Bad("put template without text or html", {"subject": "s"}, "text", method="put",
        path="/api/v1/solutions/acme/templates/t1"),
    Bad("put template syntax error", {"subject": "s", "html": "{% if %}"}, "html",
        method="put", path="/api/v1/solutions/acme/templates/t1"),
    Bad("put template too large", {"subject": "s", "text": "x" * 5000}, "subject",
        method="put", path="/api/v1/solutions/acme/templates/t1"),
    Bad("put template bad name", {"subject": "s", "text": "t"}, "name", method="put",
        path="/api/v1/solutions/acme/templates/-x"),
    Bad("render missing variable", {"data": {}}, "template_data",
        path="/api/v1/solutions/acme/templates/welcome/render"),
    Bad("render unknown template", {"data": {}}, None, 404, "NotFound",
        path="/api/v1/solutions/acme/templates/nope/render"),
    Bad("cancel unknown task", None, None, 404, "NotFound", method="delete",
        path="/api/v1/solutions/acme/tasks/no-such-task"),
]


@dataclass
class World:
    client: FlaskClient
    redis: redis.Redis
    token: str


@pytest.fixture(scope="module")
def world(redis_url: str) -> Iterator[World]:
    """One app, solution ``acme`` with templates ``welcome`` (``Hello {{ name }}``) and
    ``escape`` (a sandbox escape attempt)."""
    client_redis = redis.Redis.from_url(redis_url)
    client_redis.flushdb()
    settings = make_settings(redis_url, max_attachment_bytes=LIMIT, max_template_bytes=4096)
    client = create_app(settings).test_client()
    r = client.post("/api/v1/solutions", json={"solution_id": "acme"}, headers=auth(ADMIN))
    token = r.get_json()["token"]
    for name, body in (
        ("welcome", {"subject": "Hello {{ name }}", "text": "Hi {{ name }}"}),
        ("escape", {"subject": "x", "text": "{{ ''.__class__.__mro__[1].__subclasses__() }}"}),
    ):
        assert 201 == client.put(f"/api/v1/solutions/acme/templates/{name}", json=body,
                                 headers=auth(token)).status_code
    yield World(client, client_redis, token)
    client_redis.flushdb()
    client_redis.close()


def test_the_table_is_large_enough() -> None:
    """At least 30 distinct bad inputs, each with its own name."""
    assert len(CASES) >= 30
    assert len({c.name for c in CASES}) == len(CASES)


def _held(client: redis.Redis) -> tuple[int, int, int, int]:
    return (queue_length(client), int(client.zcard(keys.schedule())),
            int(client.zcard(keys.accepted())),
            len(list(client.scan_iter("postroom:*:attachments:*"))))  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_richer_input(world: World, case: Bad) -> None:
    """The status, ``type`` and named field are the ones expected, and nothing was queued,
    scheduled or stored."""
    before = _held(world.redis)
    kwargs: dict[str, Any] = {"headers": auth(world.token)}
    if case.body is not None:
        kwargs["json"] = case.body
    r = getattr(world.client, case.method)(case.path, **kwargs)
    body = r.get_json()
    assert (case.status, case.type) == (r.status_code, body["type"]), body
    if case.field is not None:
        assert case.field in body["fields"], body
        assert body["fields"][case.field] and all(isinstance(m, str)
                                                  for m in body["fields"][case.field])
    assert before == _held(world.redis)


def test_an_attachment_error_names_its_index(world: World) -> None:
    """An attachment's refusal says which item (by its 0-based index) and which field."""
    r = world.client.post(SEND, json=with_att(att(), att(filename="run.exe")),
                          headers=auth(world.token))
    messages = r.get_json()["fields"]["attachments"]
    assert 1 == len(messages) and messages[0].startswith("Item 1: filename: "), messages
