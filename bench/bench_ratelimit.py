"""How fast the hLimit bucket takes tokens, against a plain INCR round trip on the same Redis.

Run on purpose:  .venv/bin/python bench/bench_ratelimit.py [--redis-url URL] [--seconds S]

Each row runs for a fixed time, first ``INCR`` (the baseline) and then each bucket call,
with one client, N threads sharing one client, and N processes with a client each:

- ``take``: one bucket, no ledger (the simplest write path: every take is allowed);
- ``take2``: the worker's call, a solution bucket, a tighter request bucket and the
  message's ledger (a new one per call), all allowed;
- ``peek``: intake's early answer (reads and computes, writes nothing);
- ``reserve``: a drained bucket, so every call holds a slot in line (the ``defer`` path).

Ratios are against INCR measured in the same row. Only the keys this run creates are
deleted; nothing is flushed.
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from multiprocessing.queues import Queue

import redis

from postroom.shared import keys
from postroom.shared.ratelimit import TokenBucket

DEFAULT_URL = "redis://127.0.0.1:6379/14"
CAPACITY = 1_000_000_000
PERIOD_S = 3600.0


KINDS = ("take", "take2", "peek", "reserve")


def _op(client: redis.Redis, sid: str, kind: str) -> Callable[[], object]:
    if kind == "incr":
        key = f"{keys.NS}:{{{sid}}}:bench:incr"
        return lambda: client.incr(key)
    bucket = TokenBucket(client, PERIOD_S)
    tag = f"{os.getpid()}-{id(client)}"
    counter = itertools.count()
    if kind == "take":
        return lambda: bucket.take(sid, CAPACITY)
    if kind == "take2":
        return lambda: bucket.take(
            sid, CAPACITY, CAPACITY - 1, once_key=keys.ledger(sid, f"{tag}-{next(counter)}")
        )
    if kind == "peek":
        return lambda: bucket.peek(sid, CAPACITY, CAPACITY - 1)
    if kind == "reserve":
        # capacity 1 in a separate bucket: after the first call, every call reserves
        line = f"{sid}-line"
        return lambda: bucket.reserve(
            line, 1, once_key=keys.ledger(line, f"{tag}-{next(counter)}"), within_s=1e12
        )
    raise ValueError(kind)


def _loop(op: Callable[[], object], seconds: float) -> int:
    count = 0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        for _ in range(50):
            op()
        count += 50
    return count


def _process_main(
    url: str, sid: str, kind: str, seconds: float, start: float, out: Queue[int]
) -> None:
    client = redis.Redis.from_url(url)
    op = _op(client, sid, kind)
    op()  # load the script and open the connection before the clock starts
    time.sleep(max(0.0, start - time.time()))
    out.put(_loop(op, seconds))


def run_single(url: str, sid: str, kind: str, seconds: float) -> float:
    client = redis.Redis.from_url(url)
    op = _op(client, sid, kind)
    op()
    began = time.perf_counter()
    count = _loop(op, seconds)
    return count / (time.perf_counter() - began)


def run_threads(url: str, sid: str, kind: str, seconds: float, n: int) -> float:
    client = redis.Redis.from_url(url, max_connections=n)
    op = _op(client, sid, kind)
    op()
    counts: list[int] = []
    barrier = threading.Barrier(n + 1)

    def worker() -> None:
        barrier.wait()
        counts.append(_loop(op, seconds))

    threads = [threading.Thread(target=worker) for _ in range(n)]
    for t in threads:
        t.start()
    barrier.wait()
    began = time.perf_counter()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - began)


def run_processes(url: str, sid: str, kind: str, seconds: float, n: int) -> float:
    ctx = multiprocessing.get_context("spawn")
    out: Queue[int] = ctx.Queue()
    start = time.time() + 1.5  # time for the children to import and connect
    procs = [
        ctx.Process(target=_process_main, args=(url, sid, kind, seconds, start, out))
        for _ in range(n)
    ]
    for p in procs:
        p.start()
    total = sum(out.get() for _ in procs)
    for p in procs:
        p.join()
    return total / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", default=DEFAULT_URL)
    parser.add_argument("--seconds", type=float, default=2.0, help="per measurement")
    parser.add_argument("-n", type=int, default=4, help="threads / processes")
    args = parser.parse_args()

    sid = f"bench-{os.getpid()}"
    client = redis.Redis.from_url(args.redis_url)
    info = client.info("server")
    print(f"redis {info['redis_version']} at {args.redis_url}; {args.seconds:g} s per cell")
    print(f"{'mode':<14}{'INCR/s':>9}" + "".join(f"{k + '/s':>10}{'x':>6}" for k in KINDS))
    runs: list[tuple[str, Callable[[str], float]]] = [
        ("1 client", lambda kind: run_single(args.redis_url, sid, kind, args.seconds)),
        (
            f"{args.n} threads",
            lambda kind: run_threads(args.redis_url, sid, kind, args.seconds, args.n),
        ),
        (
            f"{args.n} processes",
            lambda kind: run_processes(args.redis_url, sid, kind, args.seconds, args.n),
        ),
    ]
    try:
        for label, run in runs:
            incr = run("incr")
            cells = "".join(f"{rate:>10,.0f}{rate / incr:>6.2f}" for rate in map(run, KINDS))
            print(f"{label:<14}{incr:>9,.0f}{cells}", flush=True)
    finally:
        for pattern in (f"{keys.NS}:{{{sid}}}:*", f"{keys.NS}:{{{sid}-line}}:*"):
            created = list(client.scan_iter(match=pattern, count=1000))
            for i in range(0, len(created), 1000):
                client.delete(*created[i : i + 1000])
        client.close()


if __name__ == "__main__":
    main()
