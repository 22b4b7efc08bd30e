"""Property-based API testing: schemathesis generates requests from the app's own
``/api/v1/openapi.json`` and sends them to the real app (WSGI, real Redis); no answer may
be a 5xx, and every answer must be one the document describes (status, content type,
headers, body schema). Bounded and derandomized, so a run is short and repeatable."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from postroom.api.app import create_app
from postroom.api.services import Services
from postroom.shared.guard import RelayGuard
from tests.helpers import ADMIN, auth, make_settings

# a test dependency: missing is a skip on a laptop and a failure in CI
schemathesis = (
    __import__("schemathesis") if os.environ.get("CI") else pytest.importorskip("schemathesis")
)
from schemathesis import checks as st_checks  # noqa: E402
from schemathesis.generation import GenerationMode  # noqa: E402

MAX_EXAMPLES = 30  # per operation; each case is sent with both tokens: ~2,400 requests


def no_dns(host: str, port: int) -> list[str]:
    """Generated host names resolve nowhere (no lookups leave the test)."""
    raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")


@dataclass
class Harness:
    """The schemathesis schema of the app, the tokens, and a way back to the start."""

    schema: Any
    tokens: dict[str, str]
    reset: Callable[[], None]


@pytest.fixture(scope="module")
def api(redis_url: str) -> Iterator[Harness]:
    """The real app on the tests' Redis, with solution ``acme``; the guard answers every
    name as unresolvable."""
    state = redis.Redis.from_url(redis_url)
    config = make_settings(redis_url)
    svc = Services.build(config)
    svc.guard = RelayGuard(config.smtp_allow_hosts, config.smtp_allow_ports, resolver=no_dns)
    app = create_app(config, svc)
    tokens = {"admin": ADMIN}

    def reset() -> None:
        """An empty Redis but for solution ``acme`` (a new token)."""
        state.flushdb()
        r = app.test_client().post("/api/v1/solutions", json={"solution_id": "acme"},
                                   headers=auth(ADMIN))  # fmt: skip
        assert 201 == r.status_code, r.get_json()
        tokens["solution"] = r.get_json()["token"]

    reset()
    schema = schemathesis.openapi.from_dict(_narrowed(app.test_client().get(
        "/api/v1/openapi.json").get_json()))  # fmt: skip
    schema.app = app
    yield Harness(schema, tokens, reset)
    state.flushdb()
    state.close()


def _narrowed(document: dict[str, Any]) -> dict[str, Any]:
    """The app's own document, with two narrowings of the harness: ``sid`` is the one
    solution that exists, and no operation takes ``?wait`` (no worker runs: waiting would
    only time out). Done in the document rather than on each case, so that the cases
    schemathesis generates are the cases it sends and judges."""
    document["components"]["parameters"]["sid"]["schema"] = {"type": "string",
                                                              "enum": ["acme"]}  # fmt: skip
    wait = "#/components/parameters/wait"
    for path in document["paths"].values():
        for operation in path.values():
            if isinstance(operation, dict) and "parameters" in operation:
                operation["parameters"] = [p for p in operation["parameters"]
                                           if p.get("$ref") != wait]  # fmt: skip
    return document


def _operations(api: Harness) -> list[Any]:
    return [result.ok() for result in api.schema.get_all_operations()]


def _skip_forced(case: Any) -> bool:
    """Cases whose deliberate fault the harness undoes (it always sends a token and the
    existing solution's id): their answers say nothing about the document."""
    from schemathesis.core.parameters import ParameterLocation

    meta = case.meta
    if meta is None:
        return False
    forced = (ParameterLocation.HEADER, ParameterLocation.PATH)
    return any(loc in forced and info.mode.is_negative for loc, info in meta.components.items())


def _documented_refusal(response: Any) -> bool:
    """Refusals of schema-valid requests that depend on more than the request, and that
    the document therefore states in words (README, "The OpenAPI document and the
    fuzzer"); each is recognised by its answer:

    - 400 ``InvalidRelay``: the address guard (a relay host that is an IP literal in a
      loopback, private or otherwise non-public range, ``::148`` or ``0.0.1.26``), or a
      PATCH whose port the stored relay does not allow;
    - 422 ``IdempotencyMismatch``: an ``Idempotency-Key`` reused with another body;
    - 400 naming only ``template``: a template the solution does not have, or whose data
      does not render it;
    - 400 naming only ``from``: a sender on a solution without a relay of its own;
    - 400 naming only ``send_at``, "At most 30 days ahead." (JSON Schema has no "now");
    - 400 naming only ``connection_scheme``, plain text: a PATCH to ``""`` beside a stored
      relay;
    - 400 naming only attachments' ``content_id``: one that ``html`` does not reference
      as ``cid:``, or that two attachments share.
    """
    if response.status_code not in (400, 422):
        return False
    try:
        body = response.json()
    except ValueError:
        return False
    kind = (response.status_code, body.get("type"))
    if kind in {(400, "InvalidRelay"), (422, "IdempotencyMismatch")}:
        return True
    if kind != (400, "ValidationError"):
        return False
    fields = body.get("fields") or {}
    if set(fields) in ({"template"}, {"from"}):
        return True
    if fields == {"send_at": ["At most 30 days ahead."]}:
        return True
    if set(fields) == {"connection_scheme"} and "Plain text" in fields["connection_scheme"][0]:
        return True
    inline = ("content_id: Not referenced in html", "content_id: Given to two attachments")
    return set(fields) == {"attachments"} and all(
        any(part in message for part in inline) for message in fields["attachments"]
    )


def _call_and_check(case: Any, token: str) -> None:
    """Send ``case`` with ``token`` and run every check schemathesis has on the answer;
    a documented refusal (above) is exempt from the check that schema-valid requests
    are accepted, and from that one only."""
    response = case.call(headers=auth(token))
    excluded = [st_checks.positive_data_acceptance] if _documented_refusal(response) else []
    case.validate_response(response, headers=auth(token), excluded_checks=excluded)


def test_every_operation_passes_every_check(api: Harness) -> None:
    """Every operation, with a solution's token and with the admin token, positive and
    negative generated requests, under every check schemathesis has: no 5xx, answers
    conform to the document (status, content type, headers, body), schema-valid requests
    are accepted and schema-invalid ones refused, 405s carry ``Allow``, ..."""
    tokens = api.tokens
    operations = _operations(api)
    assert 30 <= len(operations)
    for operation in operations:
        strategy = st.one_of(
            operation.as_strategy(generation_mode=GenerationMode.POSITIVE),
            operation.as_strategy(generation_mode=GenerationMode.NEGATIVE),
        )
        _explore(strategy, tokens)


def _explore(strategy: Any, tokens: dict[str, str]) -> None:
    @given(case=strategy)
    @settings(
        max_examples=MAX_EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    def run(case: Any) -> None:
        if _skip_forced(case):
            return
        for token in (tokens["solution"], tokens["admin"]):
            _call_and_check(case, token)

    run()


def test_workflows_stateful(api: Harness) -> None:
    """The stateful phase over every operation: create resources (solutions, webhooks,
    templates, suppressions, sends), then follow the document's links with their ids
    (read, change, test, rotate, cancel, delete), every check on every answer."""
    tokens = api.tokens
    machine = api.schema.as_state_machine()

    class Workflow(machine):  # type: ignore[misc, valid-type]
        def setup(self) -> None:
            api.reset()  # each scenario from the same start: replays draw alike

        def get_call_kwargs(self, case: Any) -> dict[str, Any]:
            return {"headers": auth(tokens["solution"])}

        def validate_response(self, response: Any, case: Any, **kwargs: Any) -> None:
            documented = _documented_refusal(response)
            case.validate_response(
                response,
                excluded_checks=[st_checks.positive_data_acceptance] if documented else [],
                headers=auth(tokens["solution"]),
                transport_kwargs=kwargs or None,
                recorder=self.recorder,
            )

    Workflow.run(settings=settings(max_examples=60, stateful_step_count=8, derandomize=True,
                                   database=None, deadline=None,
                                   suppress_health_check=list(HealthCheck)))  # fmt: skip
