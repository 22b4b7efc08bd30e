"""Which broker a ``POSTROOM_BROKER_URL`` names, and what Celery needs to use it well.

Three brokers, each through kombu's stock transport (postroom's own Redis transport,
:mod:`postroom.shared.celery_wire.redis_transport`, serves ``redis://`` alone):

- ``redis://`` — one Redis, the default (the state Redis itself unless told otherwise).
- ``amqp://user:pass@host:5672/vhost`` — RabbitMQ: quorum queues (replicated, durable),
  publisher confirms on every publish (an unconfirmed publish raises, and the intake
  answers 503), late acknowledgement (a consumer's unacknowledged messages go back to the
  queue the moment its connection closes), and no broker countdowns (postroom's own
  schedule, :mod:`postroom.worker.schedule`, holds retries and deferred sends).
- ``sentinel://host:26379[;sentinel://host2:26379]`` — a Redis broker behind Sentinel
  (kombu's transport); its master's name is ``POSTROOM_BROKER_MASTER_NAME``, by default the
  master named in a ``redis+sentinel://`` ``POSTROOM_REDIS_URL``.

kombu has no Redis Cluster transport: a ``redis+cluster://`` state wants RabbitMQ (or a
plain Redis) as its broker, and :func:`default_broker_url` says so at start-up.
"""

from __future__ import annotations

import socket
from typing import Any

from amqp.exceptions import AMQPError, MessageNacked

from postroom.shared.errors import ConfigError
from postroom.shared.redis_client import is_cluster_url, is_sentinel, parse_endpoints

AMQP_SCHEMES = ("amqp://", "amqps://", "pyamqp://")
#: a publish that raises one of these was not confirmed: the intake answers 503
PUBLISH_ERRORS: tuple[type[BaseException], ...] = (AMQPError, MessageNacked, socket.timeout)
#: the AMQP heartbeat timeout of a worker: RabbitMQ closes the connection of a consumer
#: it has not heard from for about twice this (a lost host) and requeues what it held
AMQP_HEARTBEAT_S = 5


def is_amqp(url: str) -> bool:
    return url.startswith(AMQP_SCHEMES)


def is_sentinel_broker(url: str) -> bool:
    return url.startswith("sentinel://")


def default_broker_url(redis_url: str) -> str:
    """The broker when ``POSTROOM_BROKER_URL`` is not set: the state Redis itself (for
    Sentinel, kombu's spelling of the same sentinels); ConfigError for a cluster."""
    if is_cluster_url(redis_url):
        raise ConfigError(
            "POSTROOM_REDIS_URL is a Redis Cluster (redis+cluster://), which cannot be a "
            "Celery broker (kombu has no cluster transport): set POSTROOM_BROKER_URL to "
            "RabbitMQ (amqp://user:pass@host:5672/vhost) or to a plain redis:// server"
        )
    if is_sentinel(redis_url):
        ends = parse_endpoints(redis_url)
        auth = f":{ends.password}@" if ends.password else ""
        return ";".join(f"sentinel://{auth}{host}:{port}/{ends.db}" for host, port in ends.hosts)
    return redis_url


def check_broker_url(broker_url: str) -> None:
    """ConfigError for a broker kombu cannot use."""
    if is_cluster_url(broker_url):
        raise ConfigError(
            "POSTROOM_BROKER_URL cannot be a Redis Cluster (kombu has no cluster transport): "
            "use RabbitMQ (amqp://…) or a plain redis:// server; Redis Cluster serves "
            "POSTROOM_REDIS_URL"
        )
    if is_sentinel(broker_url):
        raise ConfigError(
            "POSTROOM_BROKER_URL names Sentinel as sentinel://host:port[;sentinel://host:port…] "
            "(kombu's spelling) with POSTROOM_BROKER_MASTER_NAME, not redis+sentinel://"
        )


def master_name(redis_url: str, broker_master_name: str) -> str:
    """The Sentinel master of a ``sentinel://`` broker."""
    if broker_master_name:
        return broker_master_name
    if is_sentinel(redis_url):
        return parse_endpoints(redis_url).master
    raise ConfigError(
        "a sentinel:// POSTROOM_BROKER_URL needs POSTROOM_BROKER_MASTER_NAME (or a "
        "redis+sentinel://…/<master> POSTROOM_REDIS_URL to take the name from)"
    )


def broker_config(
    broker_url: str, redis_url: str, broker_master_name: str, redis_transport: dict[str, Any]
) -> dict[str, Any]:
    """Celery settings for the broker beyond the common ones: ``redis_transport`` is what
    a Redis broker's transport takes (visibility window, timeouts); Sentinel adds its
    master, RabbitMQ gets quorum queues and publisher confirms."""
    if is_sentinel_broker(broker_url):
        options = {**redis_transport, "master_name": master_name(redis_url, broker_master_name)}
        return {"broker_transport_options": options}
    if is_amqp(broker_url):
        return {
            "broker_transport_options": {"confirm_publish": True},
            "task_default_queue_type": "quorum",
            "worker_detect_quorum_queues": True,
            "broker_heartbeat": AMQP_HEARTBEAT_S,
        }
    return {}


def publish_options(broker_url: str, confirm_timeout_s: float) -> dict[str, Any]:
    """Options of each ``send_task``: on RabbitMQ, how long to wait for the confirm."""
    if is_amqp(broker_url):
        return {"confirm_timeout": confirm_timeout_s}
    return {}
