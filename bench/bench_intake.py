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

``--paths`` measures what each of the intake's kept splits gains (``api/intake/``), each
variant in an app of its own, alternating, five rounds, medians: single sends as they run
(one step), with the one-step path off (two steps), and two steps with the first document
written apart (as when ``POSTROOM_RESULT_BACKEND`` is another Redis); a batch of 50 as it
runs and with each message queued alone.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from collections.abc import Callable
from typing import Any

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
    parser.add_argument("--paths", action="store_true",
                        help="what each of the intake's splits gains (see above)")
    args = parser.parse_args()
    if args.paths:
        paths(args.requests)
        return
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


def paths(n: int) -> None:
    server = EmbeddedRedis().start()
    try:
        settings = Settings(
            redis_url=server.url, admin_token="bench-admin", secret_key=generate_key(),
            default_smtp_url="smtp+plain://127.0.0.1:25", log_level="WARNING",
        )

        def app(one_step: bool = True, document_apart: bool = False) -> Any:
            flask_app = create_app(settings)
            svc = flask_app.extensions["postroom"]
            if not one_step:
                svc.one_step = None
            if document_apart:  # another client: the intake writes the document on its own
                svc.results = redis.Redis.from_url(server.url)
            return flask_app.test_client()

        apps = {"one step": app(), "two steps": app(one_step=False),
                "two steps, document apart": app(one_step=False, document_apart=True),
                "batch of 50": app(), "batch of 50, each alone": app(one_step=False)}
        admin = {"Authorization": "Bearer bench-admin"}
        token = apps["one step"].post("/api/v1/solutions", headers=admin, json={
            "solution_id": "bench", "hLimit": 10**9}).get_json()["token"]
        auth = {"Authorization": f"Bearer {token}"}
        sent = itertools.count()

        def one(each: Any) -> Callable[[], int]:
            def post() -> int:
                body = {**BODY, "to": [f"rcpt-{next(sent)}@example.com"]}
                r = each.post("/api/v1/solutions/bench/email", json=body, headers=auth)
                return int(r.status_code)
            return post

        def batch(each: Any) -> Callable[[], int]:
            def post() -> int:
                messages = [{**BODY, "to": [f"rcpt-{next(sent)}@example.com"]}
                            for _ in range(50)]  # fmt: skip
                r = each.post("/api/v1/solutions/bench/email/batch", headers=auth,
                              json={"messages": messages})
                return 202 if r.get_json()["queued"] == 50 else 500
            return post

        posts = {name: (batch if name.startswith("batch") else one)(each)
                 for name, each in apps.items()}  # fmt: skip
        per = {name: 50 if name.startswith("batch") else 1 for name in apps}
        rounds: dict[str, list[tuple[float, float]]] = {name: [] for name in apps}
        for post in posts.values():  # connections opened, scripts loaded, records kept
            for _ in range(20):
                post()
        for _ in range(5):
            for name, post in posts.items():
                k = max(1, n // 5 // per[name])
                cpu0, wall0 = time.process_time(), time.perf_counter()
                for _ in range(k):
                    assert post() == 202
                cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
                rounds[name].append((cpu / k / per[name] * 1e3, wall / k / per[name] * 1e3))
        print(f"{'per message':28}{'CPU ms':>10}{'wall ms':>10}")
        medians = {}
        for name, values in rounds.items():
            cpu = sorted(v[0] for v in values)[2]
            wall = sorted(v[1] for v in values)[2]
            medians[name] = (cpu, wall)
            print(f"{name:28}{cpu:10.3f}{wall:10.3f}")
        for slow, fast in (("two steps", "one step"),
                           ("two steps, document apart", "two steps"),
                           ("batch of 50, each alone", "batch of 50")):  # fmt: skip
            (sc, sw), (fc, fw) = medians[slow], medians[fast]
            print(f"{slow} / {fast}: CPU {sc / fc:.2f}x, wall {sw / fw:.2f}x")
    finally:
        server.cleanup()


if __name__ == "__main__":
    main()
