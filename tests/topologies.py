"""Real engines beyond one Redis, for the tests: RabbitMQ, a Redis Cluster, Sentinel.

- RabbitMQ: the server on ``TEST_AMQP_URL`` (default ``amqp://guest:guest@127.0.0.1:5672``).
  The tests make a virtual host of their own (named ``TEST_AMQP_VHOST_PREFIX`` + a random
  suffix) with ``rabbitmqctl``, and delete it at the end; without ``rabbitmqctl`` they use
  ``/`` with queues named uniquely, and delete those. Each test gets a queue of its own.
- Redis Cluster: three masters (``redis-server --cluster-enabled yes``) on free loopback
  ports, their slots assigned and met through ``CLUSTER ADDSLOTS``/``MEET`` (what
  ``redis-cli --cluster create … --cluster-replicas 0`` does, without needing
  ``redis-cli``), for the whole session.
- Sentinel: a master, one replica and one sentinel, started per test (a test kills them).

A missing RabbitMQ is a skip on a laptop and a failure in CI.

:func:`topology_settings` gives a test the settings of one topology (``redis``,
``rabbitmq``, ``rabbitmq+cluster``), starting what it needs through these fixtures.
``tests/test_topologies.py`` runs on all three; ``tests/test_e2e.py`` and the fault tests
of ``tests/test_faults.py`` built on its ``stack`` fixture on those named in
``TEST_E2E_TOPOLOGIES`` (comma-separated, or ``all``; default ``redis``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

from postroom.dev.embedded_redis import free_port, redis_server_binary

TOPOLOGIES = ("redis", "rabbitmq", "rabbitmq+cluster")
AMQP_URL = os.environ.get("TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672")
VHOST_PREFIX = os.environ.get("TEST_AMQP_VHOST_PREFIX", "postroom-test-")


def _missing(what: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{what} is required in CI")
    pytest.skip(f"{what} is not available")


def _amqp_reachable(url: str) -> bool:
    from kombu import Connection

    try:
        with Connection(url, connect_timeout=2) as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
        return True
    except Exception:  # noqa: BLE001 - any failure means: not usable here
        return False


def e2e_topologies() -> list[str]:
    """The topologies ``tests/test_e2e.py`` runs on (``TEST_E2E_TOPOLOGIES``)."""
    raw = os.environ.get("TEST_E2E_TOPOLOGIES", "redis")
    return list(TOPOLOGIES) if raw == "all" else [t for t in raw.split(",") if t]


def topology_settings(request: pytest.FixtureRequest, name: str) -> dict[str, Any]:
    """Settings overrides for a stack on topology ``name``: a flushed database of the
    tests' Redis, or the session's cluster (flushed), and for RabbitMQ the tests' vhost
    and a queue of the test's own."""
    assert name in TOPOLOGIES, name
    options: dict[str, Any] = {}
    if name.startswith("rabbitmq"):
        rabbit: Rabbit = request.getfixturevalue("rabbit")
        options.update(broker_url=rabbit.url, queue=rabbit.new_queue())
    if name.endswith("cluster"):
        cluster: Cluster = request.getfixturevalue("redis_cluster")
        cluster.flush()
        options.update(redis_url=cluster.url)
    else:
        request.getfixturevalue("real_redis")
    return options


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


@dataclass
class Rabbit:
    """The tests' place on RabbitMQ: a vhost URL, and queues handed out one per test."""

    url: str
    vhost: str | None  # None: "/" with uniquely named queues
    queues: list[str] = field(default_factory=list)

    def new_queue(self) -> str:
        name = f"{VHOST_PREFIX}q-{uuid.uuid4().hex[:10]}"
        self.queues.append(name)
        return name

    def delete_queues(self) -> None:
        from kombu import Connection

        with Connection(self.url, connect_timeout=2) as conn:
            channel = conn.channel()
            for name in self.queues:
                try:
                    channel.queue_delete(name)
                except Exception:  # noqa: BLE001 - the channel closes on a missing queue
                    channel = conn.channel()
        self.queues.clear()


@pytest.fixture(scope="session")
def rabbit() -> Iterator[Rabbit]:
    """A RabbitMQ virtual host of the tests' own (deleted at the end of the session)."""
    if not _amqp_reachable(AMQP_URL):
        _missing(f"RabbitMQ at {AMQP_URL}")
    if shutil.which("rabbitmqctl") is None:
        place = Rabbit(f"{AMQP_URL}/", None)
        yield place
        place.delete_queues()
        return
    vhost = f"{VHOST_PREFIX}{uuid.uuid4().hex[:8]}"
    user = AMQP_URL.split("://", 1)[1].split(":", 1)[0]
    rabbitmqctl("add_vhost", vhost)
    try:
        rabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
        yield Rabbit(f"{AMQP_URL}/{vhost}", vhost)
    finally:
        rabbitmqctl("delete_vhost", vhost)


# -- Redis servers of the tests' own --------------------------------------------------------


class Server:
    """One ``redis-server`` (or ``--sentinel``) process on a free loopback port."""

    def __init__(self, directory: Path, *options: str, sentinel: bool = False,
                 port: int | None = None) -> None:
        self.port = port or free_port()
        self.dir = directory / str(self.port)
        self.dir.mkdir(parents=True)
        self.options = options
        self.sentinel = sentinel
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Server:
        binary = shutil.which("redis-server") or redis_server_binary()
        config = self.dir / "redis.conf"
        lines = [f"port {self.port}", "bind 127.0.0.1", f"dir {self.dir}", "save \"\"",
                 "appendonly no", "protected-mode no", "logfile redis.log", *self.options]
        config.write_text("\n".join(lines) + "\n")
        args = [binary, str(config)] + (["--sentinel"] if self.sentinel else [])
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                return self
            except redis.RedisError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise AssertionError(f"redis-server on {self.port} did not start") from None
                time.sleep(0.05)

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_connect_timeout=1, socket_timeout=5)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@dataclass
class Cluster:
    nodes: list[Server]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def flush(self) -> None:
        for node in self.nodes:
            node.client().flushall()


def cluster_port() -> int:
    """A free port whose cluster bus port (the port + 10000) is free too."""
    import socket

    for _ in range(200):
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise AssertionError("no free port pair for a cluster node")


def start_cluster(directory: Path, masters: int = 3) -> Cluster:
    """``masters`` cluster-enabled servers, the 16384 slots split between them, all met."""
    nodes: list[Server] = []
    try:
        for _ in range(masters):
            nodes.append(Server(directory, "cluster-enabled yes", "cluster-node-timeout 2000",
                                "cluster-config-file nodes.conf", port=cluster_port()))
            nodes[-1].start()
        return _form(nodes)
    except BaseException:
        for node in nodes:
            node.stop()
        raise


def _form(nodes: list[Server]) -> Cluster:
    masters = len(nodes)
    per = 16384 // masters
    for i, node in enumerate(nodes):
        last = 16383 if i == masters - 1 else (i + 1) * per - 1
        node.client().execute_command("CLUSTER ADDSLOTS", *range(i * per, last + 1))
    for node in nodes[1:]:
        node.client().execute_command("CLUSTER MEET", "127.0.0.1", nodes[0].port)
    deadline = time.monotonic() + 20
    while True:
        infos = [n.client().execute_command("CLUSTER INFO") for n in nodes]
        if all(i["cluster_state"] == "ok" and int(i["cluster_known_nodes"]) == masters
               for i in infos):  # fmt: skip
            return Cluster(nodes)
        if time.monotonic() > deadline:
            raise AssertionError(f"the cluster did not form: {infos}")
        time.sleep(0.1)


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[Cluster]:
    """A real three-master Redis Cluster on loopback for the session (flush it per test)."""
    directory = Path(tempfile.mkdtemp(prefix="postroom-cluster-"))
    cluster = start_cluster(directory)
    try:
        yield cluster
    finally:
        for node in cluster.nodes:
            node.stop()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def cluster_redis(redis_cluster: Cluster) -> Iterator[redis.Redis]:
    """A client of the tests' Redis Cluster (``redis+cluster://``), flushed before and after."""
    from postroom.shared.redis_client import redis_client

    redis_cluster.flush()
    client = redis_client(redis_cluster.url)
    yield client
    redis_cluster.flush()
    client.close()


@dataclass
class SentinelSet:
    master: Server
    replica: Server
    sentinel: Server
    name: str = "postroom"

    @property
    def state_url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.sentinel.port}/{self.name}"

    def current_master_port(self) -> int:
        reply = self.sentinel.client().execute_command(
            "SENTINEL GET-MASTER-ADDR-BY-NAME", self.name
        )
        return int(reply[1])


@pytest.fixture
def sentinel_set(tmp_path: Path) -> Iterator[SentinelSet]:
    """A master, a replica of it and one sentinel watching them (quorum 1, a master is
    down after 1 s without an answer)."""
    name = "postroom"
    servers: list[Server] = []
    try:
        master = Server(tmp_path)
        servers.append(master)
        master.start()
        replica = Server(tmp_path, f"replicaof 127.0.0.1 {master.port}")
        servers.append(replica)
        replica.start()
        sentinel = Server(tmp_path, f"sentinel monitor {name} 127.0.0.1 {master.port} 1",
                          f"sentinel down-after-milliseconds {name} 1000",
                          f"sentinel failover-timeout {name} 5000", sentinel=True)  # fmt: skip
        servers.append(sentinel)
        sentinel.start()
        deadline = time.monotonic() + 15
        while b"master_link_status:up" not in replica.client().execute_command(
            "INFO replication"
        ):
            if time.monotonic() > deadline:
                raise AssertionError("the replica did not catch up with the master")
            time.sleep(0.1)
        yield SentinelSet(master, replica, sentinel, name)
    finally:
        for server in reversed(servers):
            server.stop()
