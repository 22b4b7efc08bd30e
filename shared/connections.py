"""The Redis clients a process needs: postroom's state, and the result backend."""

from __future__ import annotations

import redis

from postroom.shared.redis_client import redis_client
from postroom.shared.settings import Settings


def same_redis(url: str, other: str) -> bool:
    """Whether two URLs name the same Redis: then one client serves both, and their writes
    may share a pipeline or a script. Every "same Redis?" question is this one; where the
    clients are made, its answer is one client object (:func:`redis_clients`)."""
    return url == other


def redis_clients(settings: Settings, socket_timeout: float) -> tuple[redis.Redis, redis.Redis]:
    """Clients of ``POSTROOM_REDIS_URL`` and of ``POSTROOM_RESULT_BACKEND``: one and the
    same client when the two URLs are the same (then their writes can share a pipeline)."""
    state = redis_client(settings.redis_url, socket_timeout=socket_timeout)
    if same_redis(settings.result_backend, settings.redis_url):
        return state, state
    results = redis_client(settings.result_backend, socket_timeout=socket_timeout)
    return state, results
