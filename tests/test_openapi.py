"""The OpenAPI document: valid, complete, and derived from the validating schemas."""

from __future__ import annotations

import json
import os
from types import ModuleType
from typing import Any

import pytest

from postroom.api.openapi.spec import build_spec
from postroom.shared.schemas import load_or_raise, make_schemas
from postroom.shared.settings import Settings


def _need(module: str) -> ModuleType:
    """A test dependency: missing is a skip on a laptop and a failure in CI."""
    if os.environ.get("CI"):
        return __import__(module)
    return pytest.importorskip(module)


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    return build_spec(Settings())


def _validator(spec: dict[str, Any], component: str) -> Any:
    jsonschema = _need("jsonschema")
    schema = {"$ref": f"#/components/schemas/{component}", "components": spec["components"]}
    return jsonschema.Draft202012Validator(schema)


API_ROUTES = {
    "/solution/health": {"get"},
    "/solution/ready": {"get"},
    "/openapi.json": {"get"},
    "/solutions": {"post"},
    "/solutions/{sid}": {"get"},
    "/solutions/{sid}/config": {"put", "patch"},
    "/solutions/{sid}/email": {"post"},
    "/solutions/{sid}/email/batch": {"post"},
    "/solutions/{sid}/tasks/{task_id}": {"get", "delete"},
    "/solutions/{sid}/quota": {"get"},
    "/solutions/{sid}/suppressions": {"get"},
    "/solutions/{sid}/suppressions/{email}": {"get", "put", "delete"},
    "/solutions/{sid}/events": {"post"},
    "/solutions/{sid}/templates": {"get"},
    "/solutions/{sid}/templates/{template_name}": {"get", "put", "delete"},
    "/solutions/{sid}/templates/{template_name}/render": {"post"},
    "/solutions/{sid}/tasks": {"get"},
    "/solutions/{sid}/webhooks": {"get", "post"},
    "/solutions/{sid}/webhooks/{webhook_id}": {"get", "patch", "delete"},
    "/solutions/{sid}/webhooks/{webhook_id}/test": {"post"},
    "/solutions/{sid}/webhooks/{webhook_id}/rotate-secret": {"post"},
    "/solutions/{sid}/webhooks/{webhook_id}/deliveries": {"get"},
}
METHODS = {"get", "put", "post", "patch", "delete"}


def _operations(spec: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (path, method, op)
        for path, item in spec["paths"].items()
        for method, op in item.items()
        if method in METHODS
    ]


def test_spec_is_valid_openapi(spec: dict[str, Any]) -> None:
    """openapi-spec-validator accepts the document, and it survives a JSON round trip."""
    validator = _need("openapi_spec_validator")
    validator.validate(spec)
    assert json.loads(json.dumps(spec)) == spec


def test_every_route_is_described(spec: dict[str, Any]) -> None:
    """Each route of the HTTP API is there, with its methods, under /api/v1."""
    assert spec["servers"] == [{"url": "/api/v1"}]
    actual = {path: {m for m in item if m in METHODS} for path, item in spec["paths"].items()}
    assert actual == API_ROUTES


def test_operation_ids_are_unique(spec: dict[str, Any]) -> None:
    """Every operation has its own operationId (client generators need them)."""
    ids = [op["operationId"] for _, _, op in _operations(spec)]
    assert len(ids) == len(set(ids))


def test_auth_everywhere_but_the_public_routes(spec: dict[str, Any]) -> None:
    """Bearer auth is the default; health, ready and the document itself are public;
    every authenticated operation lists 401."""
    assert spec["security"] == [{"bearerAuth": []}]
    assert spec["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    public = {path for path, _, op in _operations(spec) if op.get("security") == []}
    assert public == {"/solution/health", "/solution/ready", "/openapi.json"}
    for path, method, op in _operations(spec):
        if path not in public:
            assert "401" in op["responses"], (path, method)


def test_send_email_operation(spec: dict[str, Any]) -> None:
    """POST …/email: the send body, Idempotency-Key, ?wait=1..30, and every answer it
    can give."""
    op = spec["paths"]["/solutions/{sid}/email"]["post"]
    assert op["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/SendRequest"
    }
    params = {p["$ref"].rsplit("/", 1)[1] for p in op["parameters"]}
    assert params == {"IdempotencyKey", "wait"}
    wait = spec["components"]["parameters"]["wait"]["schema"]
    assert (wait["minimum"], wait["maximum"]) == (1, 30)
    header = spec["components"]["parameters"]["IdempotencyKey"]
    assert (header["in"], header["name"]) == ("header", "Idempotency-Key")
    expected = {"200", "202", "400", "401", "404", "413", "415", "422", "429", "503"}
    assert set(op["responses"]) == expected
    assert "Location" in op["responses"]["202"]["headers"]


def test_send_batch_operation(spec: dict[str, Any]) -> None:
    """POST …/email/batch: a list of send requests up to POSTROOM_MAX_BATCH, 200 with an
    answer per message; an item that is not a send request is refused in its own answer,
    so the list's items are a BatchMessage or any other value."""
    op = spec["paths"]["/solutions/{sid}/email/batch"]["post"]
    body = spec["components"]["schemas"]["BatchRequest"]
    messages = body["properties"]["messages"]
    assert (1, 500) == (messages["minItems"], messages["maxItems"])
    branches = messages["items"]["anyOf"]
    assert {"$ref": "#/components/schemas/BatchMessage"} == branches[0]
    assert {"description"} == set(branches[1])  # any value
    item = spec["components"]["schemas"]["BatchMessage"]
    send = spec["components"]["schemas"]["SendRequest"]
    assert set(item["properties"]) == {*send["properties"], "idempotency_key"}
    assert (1, 255) == (item["properties"]["idempotency_key"]["minLength"],
                        item["properties"]["idempotency_key"]["maxLength"])  # fmt: skip
    assert "idempotency_key" not in send["properties"]
    assert {"200", "400", "401", "404", "413", "415", "503"} == set(op["responses"])
    result = spec["components"]["schemas"]["BatchResult"]
    assert {"queued", "refused", "results"} == set(result["required"])


def test_admin_route_lists_403_and_201(spec: dict[str, Any]) -> None:
    """Creating a solution answers 201, or 403 to a solution token."""
    responses = spec["paths"]["/solutions"]["post"]["responses"]
    assert {"201", "403"} <= set(responses)


def test_error_responses_share_the_error_body(spec: dict[str, Any]) -> None:
    """Every error response is the one ``{type, error, status}`` body; 401 names the
    WWW-Authenticate header and 429 Retry-After."""
    responses = spec["components"]["responses"]
    for response in responses.values():
        schema = response["content"]["application/json"]["schema"]
        assert schema == {"$ref": "#/components/schemas/Error"}
    assert spec["components"]["schemas"]["Error"]["required"] == ["type", "error", "status"]
    assert "WWW-Authenticate" in responses["Unauthorized"]["headers"]
    assert "Retry-After" in responses["TooManyRequests"]["headers"]


def test_task_document_schema(spec: dict[str, Any]) -> None:
    """The task document carries its documented fields and state names."""
    task = spec["components"]["schemas"]["TaskDocument"]
    assert task["properties"]["state"]["enum"] == [
        "scheduled",
        "queued",
        "deferred",
        "retrying",
        "sent",
        "failed",
        "canceled",
    ]
    assert set(task["properties"]) == {
        "task_id",
        "solution_id",
        "state",
        "attempts",
        "created_at",
        "updated_at",
        "next_attempt_at",
        "result",
        "error",
        "pending",
        "metadata",
    }
    result = spec["components"]["schemas"]["TaskResult"]["properties"]
    assert set(result) == {"status", "accepted", "rejected", "envelope", "response", "messageId"}
    assert set(result["envelope"]["properties"]) == {"from", "to"}


def test_config_view_hides_the_password(spec: dict[str, Any]) -> None:
    """A solution's configuration as shown holds no password, only whether one is set."""
    view = spec["components"]["schemas"]["SolutionConfigView"]["properties"]
    assert "connection_password" not in view
    assert view["connection_password_set"] == {"type": "boolean"}


def test_request_bodies_come_from_the_schemas(spec: dict[str, Any]) -> None:
    """Request components list exactly the marshmallow fields (JSON names) and refuse
    unknown properties, nested objects included."""
    schemas = make_schemas(Settings())
    components = spec["components"]["schemas"]
    pairs = {
        "SendRequest": schemas.send,
        "Connection": schemas.send.fields["connection"].schema,  # type: ignore[attr-defined]
        "SolutionConfig": schemas.config_put,
        "SolutionConfigPatch": schemas.config_patch,
        "SolutionCreate": schemas.create,
        "SuppressionPut": schemas.suppression,
        "Event": schemas.event,
    }
    for name, schema in pairs.items():
        keys = {field.data_key or key for key, field in schema.load_fields.items()}
        assert set(components[name]["properties"]) == keys, name
        assert components[name]["additionalProperties"] is False, name
    send = components["SendRequest"]["properties"]
    assert send["hLimit"]["type"] == ["integer", "null"]
    assert send["hLimit"]["minimum"] == 0
    # without POSTROOM_SMTP_ALLOW_HOSTS only the allowed ports and TLS toward a relay
    # (postroom.api.openapi.rules)
    (relay,) = [rule["anyOf"][1] for rule in components["Connection"]["allOf"]
                if "anyOf" in rule]  # fmt: skip
    assert relay["properties"]["port"]["enum"] == [25, 465, 587, 2525, None]
    assert relay["properties"]["scheme"]["enum"] == ["smtp", "smtps", None]
    assert components["SolutionCreate"]["required"] == ["solution_id"]


def test_settings_appear_in_the_spec() -> None:
    """Limits and defaults come from settings, as the validation's do."""
    spec = build_spec(Settings(max_recipients=7, hlimit_default=25))
    schemas = spec["components"]["schemas"]
    assert schemas["SendRequest"]["properties"]["cc"]["maxItems"] == 7
    assert schemas["SolutionConfig"]["properties"]["hLimit"]["default"] == 25
    assert "default" not in schemas["SolutionConfigPatch"]["properties"]["hLimit"]


GOOD_SEND = [
    {"to": ["a@example.com"]},
    {"bcc": ["a@example.com"], "to": None},
    {
        "to": ["a@example.com"],
        "cc": [],
        "from": "me@example.org",
        "subject": "Grüße",
        "text": "a\r\nb\t",
        "html": None,
        "hLimit": 0,
        "connection": {"server": "smtp.example.org", "port": 465, "scheme": "smtps"},
    },
]
BAD_SEND = [
    {},
    {"to": []},
    {"to": ["a@example.com"], "unknown": 1},
    {"to": ["a@example.com"], "hLimit": "10"},
    {"to": ["a@example.com"], "hLimit": 10.5},
    {"to": ["a@example.com"], "hLimit": True},
    {"to": ["a@example.com"], "subject": "a\r\nBcc: b@example.com"},
    {"to": ["a@example.com"], "subject": "=?UTF-8?Q?=0D=0A?=Bcc: x"},
    {"to": ["a@example.com"], "subject": "x" * 999},
    {"to": ["a@example.com"], "connection": {"server": "x.org", "port": 0}},
    {"to": ["a@example.com"], "connection": {"server": "x.org", "scheme": "tls"}},
    {"to": ["a@example.com"], "connection": {"server": "x.org", "user": "a b"}},
    {"to": ["a@example.com"], "connection": {"port": 25}},
    {"to": ["a@example.com"], "connection": {"server": "x.org", "extra": 1}},
]


@pytest.mark.parametrize("body", GOOD_SEND)
def test_published_schema_accepts_what_the_api_accepts(spec: dict[str, Any], body: Any) -> None:
    """A body the API accepts is valid under the published SendRequest schema."""
    load_or_raise(make_schemas(Settings()).send, body)
    _validator(spec, "SendRequest").validate(body)


@pytest.mark.parametrize("body", BAD_SEND)
def test_published_schema_refuses_what_the_api_refuses(spec: dict[str, Any], body: Any) -> None:
    """Type, range, enum, pattern and unknown-field rules are in the published schema."""
    assert not _validator(spec, "SendRequest").is_valid(body)


def test_built_once_is_stable() -> None:
    """Two builds from the same settings are equal (the app may build it at start-up)."""
    assert build_spec(Settings()) == build_spec(Settings())


def test_the_spec_states_what_the_server_enforces(spec: dict[str, Any]) -> None:
    """Rules a fuzzer found refused although the document allowed them are stated in forms
    a generator can use: the relay port list (and no plain text) without exempt hosts, a
    suppression's expires_at in the future, control characters in text (the pattern
    compiles in the JSON Schema engine a generator uses), special-use mail domains."""
    import time

    jsonschema_rs = _need("jsonschema_rs")
    schemas = spec["components"]["schemas"]
    def valid(schema: dict[str, Any], value: Any) -> bool:
        return bool(jsonschema_rs.validator_for(schema).is_valid(value))

    for name, base, server, port, scheme in (
        ("SolutionCreate", {"solution_id": "a"}, "connection_server", "connection_port",
         "connection_scheme"),
        ("SolutionConfigPatch", {}, "connection_server", "connection_port", "connection_scheme"),
        ("Connection", {}, "server", "port", "scheme"),
    ):  # fmt: skip
        schema = schemas[name]
        relay = {**base, server: "relay.example.com"}
        assert valid(schema, {**relay, port: 2525}) and not valid(schema, {**relay, port: 2526})
        assert not valid(schema, {**relay, scheme: ""}), name
        if name != "Connection":  # a configuration without a relay: any port, waiting
            assert valid(schema, {**base, port: 2526, scheme: ""}), name
    allowing = build_spec(Settings(smtp_allow_hosts=("10.0.0.0/8",)))
    assert "allOf" not in allowing["components"]["schemas"]["Connection"]

    expires = schemas["SuppressionPut"]["properties"]["expires_at"]
    year = time.gmtime().tm_year
    assert not valid(expires, f"{year - 1}-06-01T00:00:00Z")
    assert valid(expires, f"{year + 1}-06-01T00:00:00Z")
    text = schemas["SendRequest"]["properties"]["text"]
    assert not valid(text, "a\x0bb") and not valid(text, "a\x00b")
    assert valid(text, "line 1\r\nline 2\tend")
    subject = schemas["SendRequest"]["properties"]["subject"]
    assert not valid({k: v for k, v in subject.items() if k != "not"}, "a\x85b")
    to = schemas["SendRequest"]["properties"]["to"]
    assert not valid(to, ["someone@example.test"]) and valid(to, ["someone@example.com"])
