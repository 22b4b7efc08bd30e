"""Which broker and Redis each URL names, and the clear refusals of the impossible."""

from __future__ import annotations

import pytest

from postroom.shared.errors import ConfigError
from postroom.shared.queue import celery_config
from postroom.shared.redis_client import parse_endpoints
from postroom.shared.settings import Settings


def from_env(**env: str) -> Settings:
    return Settings.from_env({f"POSTROOM_{k.upper()}": v for k, v in env.items()},
                             require_secrets=False)  # fmt: skip


def test_a_cluster_for_state_without_a_broker_is_refused_naming_the_way_out() -> None:
    """kombu has no Redis Cluster transport: a cluster state URL with no broker URL fails
    at start-up, naming POSTROOM_BROKER_URL and RabbitMQ."""
    with pytest.raises(ConfigError) as err:
        from_env(redis_url="redis+cluster://10.0.0.1:7000,10.0.0.2:7000")
    assert "POSTROOM_BROKER_URL" in str(err.value) and "amqp://" in str(err.value)


def test_a_cluster_as_the_broker_is_refused() -> None:
    with pytest.raises(ConfigError, match="cannot be a Redis Cluster"):
        from_env(redis_url="redis://h:1/0", broker_url="redis+cluster://10.0.0.1:7000")


def test_a_cluster_for_state_with_rabbitmq_is_fine() -> None:
    s = from_env(redis_url="redis+cluster://10.0.0.1:7000", broker_url="amqp://u:p@mq:5672/v")
    assert ("amqp://u:p@mq:5672/v", "redis+cluster://10.0.0.1:7000") == (
        s.broker_url, s.result_backend)


def test_rabbitmq_gets_quorum_queues_and_publisher_confirms() -> None:
    """On amqp:// the queue is declared quorum and every publish waits for a confirm."""
    config = celery_config(from_env(broker_url="amqp://u:p@mq:5672/v",
                                    broker_confirm_timeout_s="3"))  # fmt: skip
    assert "quorum" == config["task_default_queue_type"]
    assert {"confirm_publish": True} == config["broker_transport_options"]
    assert 3.0 == config["postroom_confirm_timeout_s"]


def test_sentinel_state_makes_a_sentinel_broker_on_the_same_master() -> None:
    """``redis+sentinel://`` for state: the broker defaults to kombu's ``sentinel://`` on
    the same sentinels, with the master's name in its transport options."""
    s = from_env(redis_url="redis+sentinel://:pw@s1:26379,s2:26380/mymaster/3")
    assert "sentinel://:pw@s1:26379/3;sentinel://:pw@s2:26380/3" == s.broker_url
    options = celery_config(s)["broker_transport_options"]
    assert "mymaster" == options["master_name"]
    assert s.visibility_timeout_s == options["visibility_timeout"]


def test_a_sentinel_broker_needs_a_master_name() -> None:
    with pytest.raises(ConfigError, match="POSTROOM_BROKER_MASTER_NAME"):
        celery_config(from_env(redis_url="redis://h:1/0", broker_url="sentinel://s1:26379"))
    config = celery_config(from_env(redis_url="redis://h:1/0", broker_url="sentinel://s1:26379",
                                    broker_master_name="m"))  # fmt: skip
    assert "m" == config["broker_transport_options"]["master_name"]


def test_endpoint_urls_are_parsed_or_refused_clearly() -> None:
    ends = parse_endpoints("redis+sentinel://s1:26379,[::1]:26380/main")
    assert ((("s1", 26379), ("::1", 26380)), "main", 0) == (ends.hosts, ends.master, ends.db)
    assert ("h", 7000) == parse_endpoints("redis+cluster://:secret@h:7000").hosts[0]
    with pytest.raises(ConfigError, match="master"):
        parse_endpoints("redis+sentinel://s1:26379")
    with pytest.raises(ConfigError, match="host:port") as err:
        parse_endpoints("redis+cluster://:secret@nohostport")
    assert "secret" not in str(err.value)
