"""One Redis client for one ``POSTROOM_REDIS_URL`` (or ``POSTROOM_RESULT_BACKEND``).

Three shapes of URL, one function (:func:`redis_client`) that every process calls to make
its state and result clients:

- ``redis://host:port/db`` (and ``rediss://``, ``unix://``): one server, ``redis.Redis``.
- ``redis+cluster://[:password@]host:port[,host:port…]``: Redis Cluster; the nodes given
  are seeds, the client learns the others. Every key of one solution carries the hash tag
  ``{sid}`` (:mod:`postroom.shared.keys`), so each script's keys sit in one slot; scripts are called
  directly (``EVALSHA`` routed by their first key), never from a cluster pipeline.
- ``redis+sentinel://[:password@]host:port[,host:port…]/<master>[/<db>]``: the master
  that the sentinels name, found again after a failover (a client of it reconnects to the
  new master on its next command).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import unquote

import redis
from redis.cluster import ClusterNode, ClusterPipeline, RedisCluster
from redis.sentinel import Sentinel

from postroom.shared.errors import ConfigError

CLUSTER_SCHEME = "redis+cluster://"
SENTINEL_SCHEME = "redis+sentinel://"


@dataclass(frozen=True)
class Endpoints:
    """What a cluster or sentinel URL names: its hosts, and for Sentinel the master."""

    hosts: tuple[tuple[str, int], ...]
    password: str | None
    master: str = ""
    db: int = 0


def is_cluster_url(url: str) -> bool:
    return url.startswith(CLUSTER_SCHEME)


def is_cluster(client: Any) -> bool:
    """Whether ``client`` (a client or a pipeline) talks to a Redis Cluster."""
    return isinstance(client, (RedisCluster, ClusterPipeline))


def is_sentinel(url: str) -> bool:
    return url.startswith(SENTINEL_SCHEME)


def parse_endpoints(url: str) -> Endpoints:
    """The hosts (and master, db) of a ``redis+cluster://`` or ``redis+sentinel://`` URL;
    ConfigError naming what is wrong."""
    scheme = CLUSTER_SCHEME if is_cluster_url(url) else SENTINEL_SCHEME
    rest = url[len(scheme) :].split("?", 1)[0]
    netloc, _, path = rest.partition("/")
    password = None
    if "@" in netloc:
        userinfo, netloc = netloc.rsplit("@", 1)
        password = unquote(userinfo.split(":", 1)[1]) if ":" in userinfo else unquote(userinfo)
        password = password or None
    hosts = []
    for part in filter(None, (p.strip() for p in netloc.split(","))):
        host, sep, port = part.rpartition(":")
        if not sep or not port.isdigit() or not host:
            raise ConfigError(f"{scheme}: {part!r} is not host:port (in {_redact(url)})")
        hosts.append((host.strip("[]"), int(port)))
    if not hosts:
        raise ConfigError(f"{scheme} needs at least one host:port (in {_redact(url)})")
    if scheme == CLUSTER_SCHEME:
        return Endpoints(tuple(hosts), password)
    master, _, db = path.strip("/").partition("/")
    if not master:
        raise ConfigError(
            f"{SENTINEL_SCHEME}host:port[,host:port…]/<master name>[/<db>] needs the master's "
            f"name (in {_redact(url)})"
        )
    if db and not db.isdigit():
        raise ConfigError(f"{SENTINEL_SCHEME}: the database {db!r} is not a number")
    return Endpoints(tuple(hosts), password, master, int(db or 0))


def _redact(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if "@" in rest.split("/", 1)[0]:
        rest = "***@" + rest.split("@", 1)[1]
    return f"{scheme}{sep}{rest}"


def redis_client(
    url: str, *, socket_timeout: float | None = 5.0, connect_timeout: float = 2.0, **options: Any
) -> redis.Redis:
    """A client of ``url``. A cluster's client is a ``RedisCluster``: the same commands,
    scripts and non-transactional pipelines, typed as ``redis.Redis`` for its callers."""
    timeouts: dict[str, Any] = {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": connect_timeout,
        **options,
    }
    if is_cluster_url(url):
        ends = parse_endpoints(url)
        cluster = RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in ends.hosts],
            password=ends.password,
            **timeouts,
        )
        return cast(redis.Redis, cluster)
    if is_sentinel(url):
        ends = parse_endpoints(url)
        sentinel_kwargs = {"socket_timeout": connect_timeout,
                           "socket_connect_timeout": connect_timeout}  # fmt: skip
        sentinel = Sentinel(list(ends.hosts), sentinel_kwargs=sentinel_kwargs)
        client: redis.Redis = sentinel.master_for(
            ends.master, db=ends.db, password=ends.password, **timeouts
        )
        return client
    return redis.Redis.from_url(url, **timeouts)
