"""Solutions: their configuration, their tokens, stored in Redis.

A solution's record is one JSON value; its SMTP password is stored encrypted, and its
token only as a SHA-256 (a token is shown once, at creation or rotation).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import redis

from postroom.shared import keys
from postroom.shared.crypto import SecretBox, hash_token, new_token
from postroom.shared.errors import Conflict, NotFound
from postroom.shared.redis_values import as_str

#: what a solution does when its bucket is empty, unless it says otherwise: answer 429
DEFAULT_POLICY = "reject"


def config_defaults(hlimit_default: int) -> dict[str, Any]:
    """What a solution's configuration holds where it says nothing (``hLimit``:
    ``POSTROOM_HLIMIT_DEFAULT``)."""
    return {
        "connection_server": None,
        "connection_user": None,
        "connection_password": None,
        "connection_port": None,
        "connection_scheme": "smtp",
        "hLimit": hlimit_default,
        "hLimit_policy": DEFAULT_POLICY,
    }


def hlimit_of(config: Mapping[str, Any], default: int) -> int:
    """A solution's hLimit: its configuration's, else ``default`` (``POSTROOM_HLIMIT_DEFAULT``).
    The scripts that read a record in Redis apply the same rule, given the same default
    (``shared/lua/intake_peek.lua``, ``shared/lua/attempt_begin.lua``)."""
    value = config.get("hLimit")
    return default if value is None else int(value)


@dataclass(frozen=True)
class Solution:
    solution_id: str
    created_at: float
    config: dict[str, Any]  # password encrypted under "connection_password"
    #: SHA-1 of the record as stored, when it was read from Redis ("" otherwise): which
    #: version of the record this is (see api/intake/one_step.py)
    digest: str = field(default="", compare=False, repr=False)

    def hlimit(self, default: int) -> int:
        """This solution's hLimit (``default``: ``POSTROOM_HLIMIT_DEFAULT``)."""
        return hlimit_of(self.config, default)

    @property
    def policy(self) -> str:
        return str(self.config.get("hLimit_policy") or DEFAULT_POLICY)

    def public(self) -> dict[str, Any]:
        """What the API shows: never the password, only whether one is set."""
        config = {k: v for k, v in self.config.items() if k != "connection_password"}
        config["connection_password_set"] = bool(self.config.get("connection_password"))
        return {
            "solution_id": self.solution_id,
            "created_at": iso(self.created_at),
            "config": config,
        }

def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1000):03d}Z"


def _solution(sid: str, raw: bytes | str | None) -> Solution:
    if raw is None:
        raise NotFound(f"solution {sid!r} not found")
    doc = json.loads(raw)
    data = raw if isinstance(raw, bytes) else raw.encode()
    digest = hashlib.sha1(data, usedforsecurity=False).hexdigest()
    return Solution(doc["solution_id"], doc["created_at"], doc["config"], digest)


class SolutionStore:
    def __init__(self, client: redis.Redis, box: SecretBox, hlimit_default: int) -> None:
        self._r = client
        self._box = box
        # what a configuration that does not say takes
        self.defaults = config_defaults(hlimit_default)

    # -- reads --------------------------------------------------------------------

    def get(self, sid: str) -> Solution:
        return _solution(sid, self._r.get(keys.solution(sid)))

    def owner_and_get(self, token: str | None, sid: str) -> tuple[str | None, Solution]:
        """In one round trip: whose ``token`` is (None when unknown, or when no token is
        given) and solution ``sid`` (NotFound when it does not exist)."""
        pipe = self._r.pipeline(transaction=False)
        read = self.queue_owner_and_get(pipe, token, sid)
        owner, solution = read(pipe.execute())
        if solution is None:
            raise NotFound(f"solution {sid!r} not found")
        return owner, solution

    def queue_owner_and_get(
        self, pipe: Any, token: str | None, sid: str
    ) -> Callable[[list[Any]], tuple[str | None, Solution | None]]:
        """Queue :meth:`owner_and_get`'s reads on ``pipe`` (its first replies); returns
        what turns the pipeline's replies into (owner, solution or None)."""
        if token is not None:
            pipe.get(keys.token(hash_token(token)))
        pipe.get(keys.solution(sid))

        def read(replies: list[Any]) -> tuple[str | None, Solution | None]:
            owner = replies[0] if token is not None else None
            raw = replies[1 if token is not None else 0]
            solution = None if raw is None else _solution(sid, raw)
            return (as_str(owner) if owner is not None else None), solution

        return read

    def by_token(self, token: str) -> str | None:
        sid = self._r.get(keys.token(hash_token(token)))
        return as_str(sid) if sid is not None else None

    def list_ids(self) -> list[str]:
        return sorted(as_str(m) for m in self._r.smembers(keys.solutions_index()))

    # -- writes -------------------------------------------------------------------

    def create(self, sid: str, config: dict[str, Any], token: str | None = None) -> str:
        """Create a solution; returns its token (given, or a new one)."""
        token = token or new_token()
        doc: dict[str, Any] = {
            "solution_id": sid,
            "created_at": time.time(),
            "token_hash": hash_token(token),
            "config": self._seal({**self.defaults, **config}),
        }
        if not self._r.set(keys.solution(sid), json.dumps(doc), nx=True):
            raise Conflict(f"solution {sid!r} already exists")
        pipe = self._r.pipeline()
        pipe.set(keys.token(doc["token_hash"]), sid)
        pipe.sadd(keys.solutions_index(), sid)
        pipe.execute()
        return token

    def replace_config(self, sid: str, config: dict[str, Any]) -> Solution:
        return self._update(sid, lambda _old: {**self.defaults, **config})

    def patch_config(self, sid: str, changes: dict[str, Any]) -> Solution:
        def apply(old: dict[str, Any]) -> dict[str, Any]:
            new = dict(old)
            for name, value in changes.items():
                new[name] = self.defaults[name] if value is None else value
            return new

        return self._update(sid, apply)

    def rotate_token(self, sid: str) -> str:
        """A new token for ``sid``; the old one stops working. The token entries live
        outside the solution's hash slot (Redis Cluster), so they are written beside the
        record's transaction: the new entry before it, the old one removed after it."""
        token = new_token()
        new_hash = hash_token(token)
        replaced: list[str] = []

        def change(doc: dict[str, Any], pipe: Any) -> None:
            replaced.append(doc["token_hash"])
            doc["token_hash"] = new_hash

        self._r.set(keys.token(new_hash), sid)
        try:
            self._rewrite(sid, change)
        except BaseException:
            self._r.delete(keys.token(new_hash))
            raise
        self._r.delete(keys.token(replaced[-1]))
        return token

    def delete(self, sid: str) -> None:
        raw = self._r.get(keys.solution(sid))
        if raw is None:
            raise NotFound(f"solution {sid!r} not found")
        doc = json.loads(raw)
        pipe = self._r.pipeline()
        pipe.delete(keys.solution(sid))
        pipe.delete(keys.token(doc["token_hash"]))  # another hash slot: a command of its own
        pipe.delete(keys.bucket(sid))
        pipe.delete(keys.suppressions(sid))
        pipe.delete(keys.webhooks(sid))  # the workers drop the endpoints' queues after it
        pipe.srem(keys.solutions_index(), sid)
        pipe.execute()

    # -- internals ----------------------------------------------------------------

    def _seal(self, config: dict[str, Any]) -> dict[str, Any]:
        sealed = dict(config)
        if sealed.get("connection_password"):
            sealed["connection_password"] = self._box.encrypt(sealed["connection_password"])
        return sealed

    def _update(self, sid: str, change: Any) -> Solution:
        def apply(doc: dict[str, Any], pipe: Any) -> None:
            old = doc["config"]
            new = change(old)
            # a password carried over from the stored config is already sealed
            password = new.get("connection_password")
            if password and password != old.get("connection_password"):
                new["connection_password"] = self._box.encrypt(password)
            doc["config"] = new

        doc = self._rewrite(sid, apply)
        return Solution(doc["solution_id"], doc["created_at"], doc["config"])

    def _rewrite(self, sid: str, change: Callable[[dict[str, Any], Any], None]) -> dict[str, Any]:
        """Read solution ``sid``'s record, let ``change`` edit it (and queue more commands
        on the transaction it is given), write it back: all or nothing, and again from
        the start if another process changed the record meanwhile."""
        key = keys.solution(sid)
        with self._r.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(key)
                    raw = pipe.get(key)
                    if raw is None:
                        raise NotFound(f"solution {sid!r} not found")
                    doc: dict[str, Any] = json.loads(raw)
                    pipe.multi()
                    change(doc, pipe)
                    pipe.set(key, json.dumps(doc))
                    pipe.execute()
                    return doc
                except redis.WatchError:
                    continue
