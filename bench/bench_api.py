"""The API alone under gunicorn, for comparing its settings: run on purpose.

    .venv/bin/python bench/bench_api.py [--requests 5000] [--rounds 3] \\
        [--api-args '' --api-args '--worker-class sync' ...]

For each set of ``postroom api`` options (default: its defaults, then gunicorn's own sync
worker), in alternating rounds, it starts an embedded ``redis-server`` and
``postroom api`` (no workers: the sends stay queued), creates a solution, and posts
``--requests`` sends closed-loop from ``bench_pipeline``'s HTTP client (16 in flight, a
connection kept while the server keeps it). It prints, per round and as medians: requests
per second, p99 latency, the API processes' CPU per request (user and system), their
voluntary context switches per request (a worker that sleeps waiting for something), and
each set's request rate as a ratio of the first set's, measured in the same run.

``--floor`` adds two floors under the same gunicorn worker class and client
(``bench/floor_app.py``): a Flask view that answers 202 at once, and one that does a single
``LPUSH`` of the body — what any Flask intake on this machine costs before it checks
anything.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

from bench_pipeline import (  # noqa: E402
    CLK_TCK,
    HOST,
    ROOT,
    Load,
    Options,
    PostroomStack,
    load_avg,
    process_tree,
    run_load,
    running_sink,
    spawn,
    stop,
    wait_http,
)

from postroom.cli import API_WORKER_CLASS, default_api_workers  # noqa: E402
from postroom.dev.embedded_redis import EmbeddedRedis, free_port  # noqa: E402

DEFAULT_VARIANTS = ["", "--worker-class sync"]
FLOORS = {"@answer": "floor: Flask answers 202", "@lpush": "floor: Flask, one LPUSH"}


@dataclass
class Round:
    rate: float
    p99_ms: float
    user_ms: float
    sys_ms: float
    switches: float


Usage = tuple[int, int, int]


def _usage(pid: int) -> Usage:
    """utime and stime in clock ticks, voluntary context switches."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        status = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return 0, 0, 0
    switches = next(
        (int(line.split()[1]) for line in status if line.startswith("voluntary_ctxt")), 0
    )
    return int(stat[11]), int(stat[12]), switches


def _round(load: Load, before: list[Usage], after: list[Usage], requests: int,
           name: str) -> Round:
    n = max(load.count, 1)
    user, sys_, switches = (
        sum(a[i] - b[i] for a, b in zip(after, before, strict=True)) for i in range(3)
    )
    if load.statuses != {202: requests}:
        raise RuntimeError(f"{name}: answers {load.statuses}")
    return Round(load.rate, load.percentile(99) * 1000, user * 1000 / CLK_TCK / n,
                 sys_ * 1000 / CLK_TCK / n, switches / n)  # fmt: skip


def measure_floor(variant: str, requests: int, log_dir: Path) -> Round:
    """``bench/floor_app.py`` under gunicorn as ``postroom api`` runs it."""
    redis_server = EmbeddedRedis()
    port = free_port()
    argv = [sys.executable, "-m", "gunicorn", "--workers", str(default_api_workers()),
            "--worker-class", API_WORKER_CLASS, "--bind", f"{HOST}:{port}",
            "--chdir", str(BENCH), "--no-control-socket", "--log-level", "warning",
            "floor_app:app"]  # fmt: skip
    path = "/api/v1/solutions/bench/email" + ("/lpush" if variant == "@lpush" else "")
    api = None
    try:
        redis_server.start()
        env = {**os.environ, "BENCH_REDIS_URL": redis_server.url, "PYTHONPATH": str(ROOT)}
        api = spawn("floor", argv, env, log_dir)
        wait_http(f"http://{HOST}:{port}/", api)
        run_load(port, path, "-", first=10_000_000, count=500, concurrency=16)
        pids = process_tree(api.proc.pid)
        before = [_usage(p) for p in pids]
        load = run_load(port, path, "-", first=0, count=requests, concurrency=16)
        after = [_usage(p) for p in pids]
    finally:
        if api is not None:
            stop(api)
        redis_server.cleanup()
    return _round(load, before, after, requests, label(variant))


def measure(variant: str, requests: int, log_dir: Path) -> Round:
    if variant in FLOORS:
        return measure_floor(variant, requests, log_dir)
    options = Options(
        messages=requests, concurrency=16, workers=0, worker_concurrency=None,
        api_workers=None, paced_seconds=0.0, baselines=False,
        api_args=tuple(shlex.split(variant)),
    )  # fmt: skip
    with running_sink() as sink:
        stack = PostroomStack(sink, log_dir, options)
        try:
            stack.start()
            stack.post(first=10_000_000, count=500)  # warm up every gunicorn worker
            assert stack.api is not None
            pids = process_tree(stack.api.proc.pid)
            before = [_usage(p) for p in pids]
            load = stack.post(first=0, count=requests)
            after = [_usage(p) for p in pids]
        finally:
            stack.stop()
    return _round(load, before, after, requests, label(variant))


def label(variant: str) -> str:
    return FLOORS.get(variant) or variant or "(defaults)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--api-args", action="append", dest="variants",
                        help="options for `postroom api`; repeat to compare (default: its "
                             "defaults, then --worker-class sync)")  # fmt: skip
    parser.add_argument("--floor", action="store_true",
                        help="also measure bench/floor_app.py's two views (see above)")
    args = parser.parse_args()
    variants = args.variants if args.variants is not None else DEFAULT_VARIANTS
    if args.floor:
        variants = [*variants, *FLOORS]
    print(f"bench_api: {args.requests} sends per round, {args.rounds} rounds, "
          f"16 in flight; {load_avg()}")  # fmt: skip
    rounds: dict[str, list[Round]] = {c: [] for c in variants}
    log_dir = Path(tempfile.mkdtemp(prefix="bench-api-"))
    for r in range(args.rounds):
        for variant in variants if r % 2 == 0 else reversed(variants):
            got = measure(variant, args.requests, log_dir)
            rounds[variant].append(got)
            print(f"  round {r + 1}  {label(variant):24} {got.rate:7.0f} req/s  "
                  f"p99 {got.p99_ms:5.1f} ms  API CPU {got.user_ms + got.sys_ms:.3f} ms/req "
                  f"(user {got.user_ms:.3f}, system {got.sys_ms:.3f})  "
                  f"voluntary switches {got.switches:.1f}/req")  # fmt: skip
    print("medians:")
    first = statistics.median(x.rate for x in rounds[variants[0]])
    for variant, measured in rounds.items():
        rate = statistics.median(x.rate for x in measured)
        cpu = statistics.median(x.user_ms + x.sys_ms for x in measured)
        switches = statistics.median(x.switches for x in measured)
        print(f"  {label(variant):24} {rate:7.0f} req/s  API CPU {cpu:.3f} ms/req  "
              f"voluntary switches {switches:.1f}/req  rate / {label(variants[0])}: "
              f"{rate / first:.2f}")  # fmt: skip
    print(f"after: {load_avg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
