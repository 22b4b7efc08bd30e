"""The solution store's writes on every Redis shape (one server, fakeredis, a cluster)."""

from __future__ import annotations

import pytest
import redis

from postroom.shared.crypto import SecretBox
from postroom.shared.errors import Conflict, NotFound
from postroom.shared.settings import Settings
from postroom.shared.solutions import SolutionStore
from tests.helpers import SECRET_KEY


def test_create_change_rotate_and_delete(any_redis: redis.Redis) -> None:
    """Create, patch (a WATCHed transaction), rotate the token (the old one stops
    answering) and delete (record, token, bucket, suppressions): the same on a Redis
    Cluster, where the token entries live in other hash slots than the record."""
    store = SolutionStore(any_redis, SecretBox(SECRET_KEY), Settings().hlimit_default)
    token = store.create("acme", {"hLimit": 7})
    with pytest.raises(Conflict):
        store.create("acme", {})
    assert "acme" == store.by_token(token)
    assert 3 == store.patch_config("acme", {"hLimit": 3}).config["hLimit"]
    new = store.rotate_token("acme")
    assert (None, "acme") == (store.by_token(token), store.by_token(new))
    assert ["acme"] == store.list_ids()
    store.delete("acme")
    assert (None, []) == (store.by_token(new), store.list_ids())
    with pytest.raises(NotFound):
        store.get("acme")
