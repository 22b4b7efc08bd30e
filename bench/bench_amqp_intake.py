"""The intake's cost per send on RabbitMQ, three ways in one run: run on purpose.

    .venv/bin/python bench/bench_amqp_intake.py [--requests 2000] [--rounds 3]

Starts an embedded ``redis-server`` for state, makes a RabbitMQ virtual host of its own
(``BENCH_AMQP_URL``, default ``amqp://guest:guest@127.0.0.1:5672``; named
``BENCH_AMQP_VHOST_PREFIX`` + a random suffix with ``rabbitmqctl``, deleted after) and posts
sends through Flask's test client, one at a time, each confirmed by RabbitMQ, printing CPU
(this process's and Redis's) and wall time per request for:

- ``send_task, two steps``: Celery's ``send_task`` per job, after the checks' round trip and
  the writes' round trip (how the intake published to RabbitMQ before);
- ``kept publisher, two steps``: the job framed by postroom and published over a kept
  connection (``shared/celery_wire/amqp_publisher.py``), the same two Redis round trips;
- ``kept publisher, one step``: as the intake runs now, the one-step script (checks and
  writes in one round trip, ``api/intake/one_step.py``), then the publish.

Rounds alternate the order; the medians and their ratios to the first way are printed.
A queue no worker consumes collects the jobs (it is deleted with the virtual host).
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from postroom.api.app import create_app  # noqa: E402
from postroom.dev.embedded_redis import EmbeddedRedis  # noqa: E402
from postroom.shared.crypto import generate_key  # noqa: E402
from postroom.shared.settings import Settings  # noqa: E402

AMQP_URL = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672")
VHOST_PREFIX = os.environ.get("BENCH_AMQP_VHOST_PREFIX", "postroom-bench-")
BODY = {"to": ["someone@example.com"], "subject": "Hello", "text": "Hello from postroom"}
WAYS = ("send_task, two steps", "kept publisher, two steps", "kept publisher, one step")


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


def intake(settings: Settings, way: str) -> Callable[[], int]:
    """A function posting one send through an app set up the given way."""
    flask_app = create_app(settings)
    svc = flask_app.extensions["postroom"]
    if way != WAYS[2]:
        svc.one_step = None  # the usual two steps
    if way == WAYS[0]:
        svc.enqueuer._amqp = None  # Celery's send_task
    app = flask_app.test_client()
    admin = {"Authorization": "Bearer bench-admin"}
    sid = f"bench-{uuid.uuid4().hex[:6]}"
    token = app.post("/api/v1/solutions", json={"solution_id": sid, "hLimit": 10**9},
                     headers=admin).get_json()["token"]  # fmt: skip
    auth = {"Authorization": f"Bearer {token}"}
    sent = itertools.count()

    def post() -> int:
        each = {**BODY, "to": [f"rcpt-{next(sent)}@example.com"]}
        return app.post(f"/api/v1/solutions/{sid}/email", json=each, headers=auth).status_code

    return post


def redis_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(post: Callable[[], int], n: int, redis_pid: int) -> tuple[float, float]:
    """CPU (this process and Redis) and wall time per send, in ms."""
    for _ in range(100):
        post()
    cpu0, wall0, redis0 = time.process_time(), time.perf_counter(), redis_cpu_s(redis_pid)
    for _ in range(n):
        assert post() == 202
    cpu = time.process_time() - cpu0 + redis_cpu_s(redis_pid) - redis0
    return cpu / n * 1e3, (time.perf_counter() - wall0) / n * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    server = EmbeddedRedis().start()
    vhost = f"{VHOST_PREFIX}{uuid.uuid4().hex[:8]}"
    rabbitmqctl("add_vhost", vhost)
    try:
        user = AMQP_URL.split("://", 1)[1].split(":", 1)[0]
        rabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
        settings = Settings(
            redis_url=server.url, broker_url=f"{AMQP_URL}/{vhost}", queue=f"{vhost}-email",
            admin_token="bench-admin", secret_key=generate_key(),
            default_smtp_url="smtp+plain://127.0.0.1:25", log_level="WARNING",
        )
        posts = {way: intake(settings, way) for way in WAYS}
        figures: dict[str, list[tuple[float, float]]] = {way: [] for way in WAYS}
        for n in range(args.rounds):
            order = WAYS[n % 3:] + WAYS[:n % 3]
            for way in order:
                assert server.proc is not None
                figures[way].append(measure(posts[way], args.requests, server.proc.pid))
        base_cpu = statistics.median(c for c, _ in figures[WAYS[0]])
        base_wall = statistics.median(w for _, w in figures[WAYS[0]])
        print(f"{args.requests} sends a way and round, {args.rounds} rounds, medians")
        print(f"{'':28}{'CPU ms':>10}{'wall ms':>10}{'CPU ratio':>11}{'wall ratio':>11}")
        for way, values in figures.items():
            cpu = statistics.median(c for c, _ in values)
            wall = statistics.median(w for _, w in values)
            print(f"{way:28}{cpu:10.3f}{wall:10.3f}{cpu / base_cpu:11.2f}"
                  f"{wall / base_wall:11.2f}")
    finally:
        rabbitmqctl("delete_vhost", vhost)
        server.cleanup()


if __name__ == "__main__":
    main()
