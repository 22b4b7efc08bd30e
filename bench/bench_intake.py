"""The intake's own cost, without HTTP: run on purpose.

    .venv/bin/python bench/bench_intake.py [--requests 2000] [--relay-name localhost]

Starts an embedded ``redis-server`` and posts sends through Flask's test client, one at a
time and each to a recipient of its own, printing CPU and wall time per request and the
Redis commands each one costs (``INFO commandstats``), beside a baseline measured in the
same run: a Flask view that parses the same JSON and does one ``LPUSH``.

``--relay-name NAME`` has every send name its own relay ``NAME`` (allowed by
``POSTROOM_SMTP_ALLOW_HOSTS``, so it must resolve), and measures the intake twice: as it
runs (each process keeps a name's addresses for half a minute) and with every request
looking the name up again, as it did before.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from collections.abc import Callable

import redis
from flask import Flask, request

from postroom.api.app import create_app
from postroom.dev.embedded_redis import EmbeddedRedis
from postroom.shared.crypto import generate_key
from postroom.shared.guard import system_resolver
from postroom.shared.settings import Settings

BODY = {"to": ["someone@example.com"], "subject": "Hello", "text": "Hello from postroom"}


def measure(post: Callable[[], int], n: int) -> tuple[float, float]:
    for _ in range(200):
        post()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for _ in range(n):
        assert post() == 202
    return (time.process_time() - cpu0) / n * 1e3, (time.perf_counter() - wall0) / n * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--relay-name", default=None, metavar="NAME")
    args = parser.parse_args()
    n, relay_name = args.requests, args.relay_name
    server = EmbeddedRedis().start()
    try:
        client = redis.Redis.from_url(server.url)
        settings = Settings(
            redis_url=server.url, admin_token="bench-admin", secret_key=generate_key(),
            default_smtp_url="smtp+plain://127.0.0.1:25", log_level="WARNING",
            smtp_allow_hosts=(relay_name,) if relay_name else (),
        )
        flask_app = create_app(settings)
        app = flask_app.test_client()
        body = BODY if relay_name is None else {
            **BODY, "connection": {"server": relay_name, "port": 2525, "scheme": ""}}
        admin = {"Authorization": "Bearer bench-admin"}
        token = app.post("/api/v1/solutions", json={"solution_id": "bench", "hLimit": 10**9},
                         headers=admin).get_json()["token"]
        auth = {"Authorization": f"Bearer {token}"}

        sent = itertools.count()

        def post() -> int:  # a recipient of its own, as most messages have
            each = {**body, "to": [f"rcpt-{next(sent)}@example.com"]}
            r = app.post("/api/v1/solutions/bench/email", json=each, headers=auth)
            return r.status_code

        client.config_resetstat()
        cpu, wall = measure(post, n)
        stats = client.info("commandstats")
        commands = sum(v["calls"] for v in stats.values()) / (n + 200)

        base = Flask("baseline")

        @base.post("/email")
        def baseline_view() -> tuple[str, int]:
            client.lpush("baseline", json.dumps(request.get_json()))
            return "{}", 202

        base_client = base.test_client()
        base_cpu, base_wall = measure(
            lambda: base_client.post("/email", json=BODY).status_code, n
        )
        print(f"{'':28}{'CPU ms':>10}{'wall ms':>10}")
        print(f"{'postroom intake':28}{cpu:10.3f}{wall:10.3f}   {commands:.1f} Redis commands")
        print(f"{'baseline (parse + LPUSH)':28}{base_cpu:10.3f}{base_wall:10.3f}")
        print(f"{'ratio':28}{cpu / base_cpu:10.2f}{wall / base_wall:10.2f}")
        if relay_name is not None:
            guard = flask_app.extensions["postroom"].guard
            guard._resolve = system_resolver  # a lookup per request, as before the cache
            fresh_cpu, fresh_wall = measure(post, n)
            print(f"{'intake, a lookup each':28}{fresh_cpu:10.3f}{fresh_wall:10.3f}   "
                  f"(relay {relay_name!r}; kept lookups: {cpu:.3f} / {wall:.3f} ms, "
                  f"{fresh_wall / wall:.2f}x the wall time)")
    finally:
        server.cleanup()


if __name__ == "__main__":
    main()
