"""The whole pipeline against a relay some tens of milliseconds away, in one run.

    .venv/bin/python bench/bench_far_relay.py                      # 50 ms, 2,000 messages
    .venv/bin/python bench/bench_far_relay.py --rtt-ms 50 --messages 4000 \\
        --env POSTROOM_RELAY_CONCURRENCY=100
    .venv/bin/python bench/bench_far_relay.py --worker-args '--concurrency 16'

What runs: an aiosmtpd sink that offers PIPELINING, in a process of its own (it counts
messages and their Message-IDs), behind a proxy that holds every reply back ``--rtt-ms``
(:mod:`tests.delay_proxy`: a relay that far away); one ``postroom worker`` with its default
options (plus ``--worker-args`` and ``--env POSTROOM_X=Y``); the API in this process
(``create_app``), through which ``--messages`` messages are posted on the batch route, 500
per request, before the worker starts (so that this process, which also runs the proxy,
is idle while the worker sends). Redis is the one at ``--redis-url`` (database 1 by
default; it is flushed).

It prints the delivery rate (messages/s from the sink's first arrival to its last), the
worker's memory (the peak of the PSS summed over its processes, and of their RSS, sampled
every 0.2 s), the relay connections open at the peak (counted at the proxy), the physical
reference for that round trip (connections x 1 / (2 x RTT): a transaction whose envelope
is pipelined takes two round trips), the bound when each message's envelope also follows
the dot of the message before on its connection (connections x 1 / RTT: one round trip,
RFC 2920; what the worker's pool does when sends wait for a busy connection), and whether
the sink received every message exactly once.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import redis  # noqa: E402
from bench_pipeline import (  # noqa: E402
    Sink,
    batch_body,
    check_ids,
    cpu_seconds,
    load_avg,
    process_tree,
)

from postroom.api.app import create_app  # noqa: E402
from postroom.shared.crypto import generate_key  # noqa: E402
from postroom.shared.settings import Settings  # noqa: E402
from tests.delay_proxy import DelayProxy  # noqa: E402

HOST = "127.0.0.1"
ADMIN = "bench-admin-token"
SID = "far"
BATCH = 500


def _kib(pid: int, path: str, field: str) -> int:
    try:
        with open(f"/proc/{pid}/{path}") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class MemorySampler(threading.Thread):
    """The peak, over time, of the PSS and RSS summed over a process tree."""

    def __init__(self, root: int, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.root = root
        self.interval = interval
        self.peak_pss = 0
        self.peak_rss = 0
        self.processes = 0
        self.cpu: dict[int, float] = {}  # CPU seconds per process, last seen
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            pids = process_tree(self.root)
            pss = sum(_kib(p, "smaps_rollup", "Pss") for p in pids)
            rss = sum(_kib(p, "status", "VmRSS") for p in pids)
            self.peak_pss = max(self.peak_pss, pss)
            self.peak_rss = max(self.peak_rss, rss)
            self.processes = max(self.processes, len(pids))
            for pid in pids:
                self.cpu[pid] = max(self.cpu.get(pid, 0.0), cpu_seconds(pid))

    def stop(self) -> None:
        self._halt.set()
        self.join(5)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rtt-ms", type=float, default=50.0)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/1")
    parser.add_argument("--worker-args", default="", help="options for postroom worker")
    parser.add_argument("--env", action="append", default=[], metavar="POSTROOM_X=Y")
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args()
    rtt = args.rtt_ms / 1000

    client = redis.Redis.from_url(args.redis_url)
    client.flushdb()
    sink = Sink(pipelining=True).start()
    proxy = DelayProxy(sink.port, rtt).start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSTROOM_")}
    env.update(
        POSTROOM_REDIS_URL=args.redis_url,
        POSTROOM_ADMIN_TOKEN=ADMIN,
        POSTROOM_SECRET_KEY=generate_key(),
        POSTROOM_DEFAULT_SMTP_URL=f"smtp+plain://{HOST}:{proxy.port}",
        POSTROOM_DEFAULT_SENDER_DOMAIN="far.postroom.localhost",
        POSTROOM_SMTP_ALLOW_HOSTS=HOST,
        POSTROOM_LOG_LEVEL="WARNING",
        PYTHONPATH=str(ROOT),
    )
    for pair in args.env:
        name, _, value = pair.partition("=")
        env[name] = value
    settings = Settings.from_env({k: v for k, v in env.items() if k.startswith("POSTROOM_")})
    app = create_app(settings).test_client()
    made = app.post("/api/v1/solutions", json={"solution_id": SID, "hLimit": 1_000_000_000},
                    headers={"Authorization": f"Bearer {ADMIN}"})  # fmt: skip
    token = made.get_json()["token"]

    # every message is posted before the worker starts: the rate is the worker's, not
    # shared with this process's API (which holds the GIL the proxy needs)
    for request in range(-(-args.messages // BATCH)):
        body = batch_body(0, request, BATCH, args.messages)
        answer = app.post(f"/api/v1/solutions/{SID}/email/batch", data=body,
                          headers={"Authorization": f"Bearer {token}",
                                   "Content-Type": "application/json"})  # fmt: skip
        if answer.status_code != 200 or answer.get_json()["refused"]:
            raise RuntimeError(f"the batch route answered {answer.status_code}")

    log_dir = Path(tempfile.mkdtemp(prefix="postroom-far-"))
    argv = [sys.executable, "-m", "postroom.cli", "worker", *shlex.split(args.worker_args)]
    with open(log_dir / "worker.log", "wb") as out:
        worker = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    cpu_start = time.process_time()
    sampler = MemorySampler(worker.pid)
    sampler.start()
    print(f"bench_far_relay: {args.messages} messages through the batch route to a relay "
          f"{args.rtt_ms:g} ms away (PIPELINING); worker {' '.join(argv[3:])} "
          f"{' '.join(args.env)}; load {load_avg()}")  # fmt: skip
    try:
        count, first, last = sink.wait_count(args.messages, args.timeout)
        time.sleep(0.5)  # anything sent twice would arrive now
    finally:
        sampler.stop()
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait()
        proxy.stop()
    line, _ = check_ids(sink, args.messages, "exactly once")
    rate = (count - 1) / max(last - first, 1e-9)
    reference = proxy.peak / (2 * rtt)
    print(f"  delivered                {count} of {args.messages} in {last - first:.1f} s")
    print(f"  delivery rate            {rate:8.1f} msg/s (first to last arrival)")
    print(f"  relay connections, peak  {proxy.peak:8d}")
    print(f"  physical reference       {reference:8.1f} msg/s "
          f"({proxy.peak} connections x 1/(2 x {args.rtt_ms:g} ms)); "
          f"rate / reference {rate / max(reference, 1e-9):.2f}")  # fmt: skip
    print(f"  one round trip each      {2 * reference:8.1f} msg/s "
          f"(the next envelope after each dot, RFC 2920); rate / bound "
          f"{rate / max(2 * reference, 1e-9):.2f}")  # fmt: skip
    print(f"  worker memory, peak      PSS {sampler.peak_pss / 1024:6.1f} MiB, "
          f"RSS {sampler.peak_rss / 1024:6.1f} MiB over {sampler.processes} processes")
    per_message = sum(sampler.cpu.values()) * 1000 / max(count, 1)
    sink_cpu = cpu_seconds(sink.proc.pid) if sink.proc.pid else 0.0
    print(f"  CPU per message          worker {per_message:.2f} ms; the relay (sink) "
          f"{sink_cpu * 1000 / max(count, 1):.2f} ms; this process (API, proxy) "
          f"{(time.process_time() - cpu_start) * 1000 / max(count, 1):.2f} ms")
    print(f"  {line}")
    print(f"  load after {load_avg()}; worker log {log_dir / 'worker.log'}")
    sink.stop()
    return 0 if "OK" in line else 1


if __name__ == "__main__":
    sys.exit(main())
