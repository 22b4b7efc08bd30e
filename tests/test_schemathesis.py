"""Property-based API testing: schemathesis generates requests from the app's own
``/api/v1/openapi.json`` and sends them to the real app (WSGI, real Redis); no answer may
be a 5xx, and every answer must be one the document describes (status, content type,
headers, body schema). Bounded and derandomized, so a run is short and repeatable."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from api.app import create_app
from api.services import Services
from shared.guard import RelayGuard
from tests.helpers import ADMIN, auth, make_settings

# a test dependency: missing is a skip on a laptop and a failure in CI
schemathesis = (
    __import__("schemathesis") if os.environ.get("CI") else pytest.importorskip("schemathesis")
)
from schemathesis import checks as st_checks  # noqa: E402
from schemathesis.generation import GenerationMode  # noqa: E402

MAX_EXAMPLES = 40  # per operation; each case is sent with both tokens: ~1,100 requests
CHECKS = [
    st_checks.not_a_server_error,
    st_checks.status_code_conformance,
    st_checks.content_type_conformance,
    st_checks.response_headers_conformance,
    st_checks.response_schema_conformance,
]


def no_dns(host: str, port: int) -> list[str]:
    """Generated host names resolve nowhere (no lookups leave the test)."""
    raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")


@pytest.fixture(scope="module")
def api(redis_url: str) -> Iterator[tuple[Any, dict[str, str]]]:
    """The real app on the tests' Redis, with solution ``acme``; the guard answers every
    name as unresolvable. Yields the schemathesis schema and the tokens."""
    state = redis.Redis.from_url(redis_url)
    state.flushdb()
    config = make_settings(redis_url)
    svc = Services.build(config)
    svc.guard = RelayGuard(config.smtp_allow_hosts, config.smtp_allow_ports, resolver=no_dns)
    app = create_app(config, svc)
    r = app.test_client().post("/api/v1/solutions", json={"solution_id": "acme"},
                               headers=auth(ADMIN))
    assert 201 == r.status_code, r.get_json()
    tokens = {"admin": ADMIN, "solution": r.get_json()["token"]}
    yield schemathesis.openapi.from_wsgi("/api/v1/openapi.json", app), tokens
    state.flushdb()
    state.close()


def _operations(api: tuple[Any, dict[str, str]]) -> list[Any]:
    schema, _ = api
    return [result.ok() for result in schema.get_all_operations()]


def test_every_operation_conforms(api: tuple[Any, dict[str, str]]) -> None:
    """For every operation, with the admin token and with a solution's token, valid and
    invalid generated requests: no 5xx, and the answer conforms to the document."""
    _, tokens = api
    operations = _operations(api)
    assert 14 <= len(operations)
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
        if "sid" in (case.path_parameters or {}):
            case.path_parameters["sid"] = "acme"  # a solution that exists
        if case.query:
            case.query.pop("wait", None)  # no worker runs: waiting would only time out
        for token in (tokens["solution"], tokens["admin"]):
            case.call_and_validate(headers=auth(token), checks=CHECKS)

    run()


# -- every check, and the stateful phase, on the webhook and task-list operations -------

NEW_OPERATIONS = ("webhooks",)


def _skip_forced(case: Any) -> bool:
    """Cases whose deliberate fault the harness undoes (it always sends a token and the
    existing solution's id): their answers say nothing about the document."""
    from schemathesis.core.parameters import ParameterLocation

    meta = case.meta
    if meta is None:
        return False
    forced = (ParameterLocation.HEADER, ParameterLocation.PATH)
    return any(loc in forced and info.mode.is_negative for loc, info in meta.components.items())


def test_webhook_and_task_list_operations_pass_every_check(
    api: tuple[Any, dict[str, str]]
) -> None:
    """The webhook routes and the task list, positive and negative requests, under every
    check schemathesis has (schema-valid requests accepted, invalid ones refused, ...)."""
    _, tokens = api
    operations = [op for op in _operations(api)
                  if set(op.definition.raw.get("tags", [])) & set(NEW_OPERATIONS)
                  or op.definition.raw.get("operationId") == "listTasks"]  # fmt: skip
    assert 9 == len(operations)
    for operation in operations:
        strategy = st.one_of(
            operation.as_strategy(generation_mode=GenerationMode.POSITIVE),
            operation.as_strategy(generation_mode=GenerationMode.NEGATIVE),
        )

        @given(case=strategy)
        @settings(max_examples=25, derandomize=True, database=None, deadline=None,
                  suppress_health_check=list(HealthCheck))
        def run(case: Any) -> None:
            if _skip_forced(case):
                return
            case.path_parameters = {**(case.path_parameters or {}), "sid": "acme"}
            for token in (tokens["solution"], tokens["admin"]):
                case.call_and_validate(headers=auth(token))

        run()


def test_webhook_workflows_stateful(api: tuple[Any, dict[str, str]]) -> None:
    """The stateful phase over the webhook routes: create an endpoint, then follow the
    document's links with its id (read, change, test, rotate, read the log, delete), every
    check on every answer."""
    schema, tokens = api
    machine = schema.include(tag="webhooks").as_state_machine()

    class Workflow(machine):  # type: ignore[misc, valid-type]
        def before_call(self, case: Any) -> None:
            case.path_parameters = {**(case.path_parameters or {}), "sid": "acme"}

        def get_call_kwargs(self, case: Any) -> dict[str, Any]:
            return {"headers": auth(tokens["solution"])}

    Workflow.run(settings=settings(max_examples=10, stateful_step_count=6, derandomize=True,
                                   database=None, deadline=None,
                                   suppress_health_check=list(HealthCheck)))  # fmt: skip
