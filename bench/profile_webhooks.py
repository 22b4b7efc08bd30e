"""Where one webhook event's CPU goes: the deliverer of ``worker/webhooks.py`` in this
process, an embedded ``redis-server``, and ``bench_webhooks.py``'s receiver (answers 204)
in a process of its own.

Run on purpose:  .venv/bin/python bench/profile_webhooks.py [--events N] [--rate R] [--cprofile]

Two ways in turn:

- ``trickle``: events are queued one by one at ``--rate`` per second (as the pipeline's last
  step queues them, one per sent message) while the deliverer runs;
- ``drain``: ``--events`` events are queued at once, then delivered.

For each it prints, per event: the CPU of this process's delivering threads (the process's
CPU less the queuing thread's own; with ``drain``, the part of it in the kernel too),
Redis's CPU and its commands (``INFO commandstats``:
the queuing scripts run by EVAL, the deliverer's by EVALSHA), the receiver's CPU, and
events/s. ``--cprofile`` adds the deliverer's top functions by CPU (each thread's own CPU time).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import threading
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

import redis  # noqa: E402
from bench_pipeline import cpu_seconds, load_avg  # noqa: E402
from bench_webhooks import Receiver  # noqa: E402

from postroom.dev.embedded_redis import EmbeddedRedis  # noqa: E402
from postroom.shared import events  # noqa: E402
from postroom.shared.crypto import SecretBox, generate_key  # noqa: E402
from postroom.shared.documents import new_document  # noqa: E402
from postroom.shared.scripts import script  # noqa: E402
from postroom.shared.settings import Settings  # noqa: E402
from postroom.shared.webhooks import WebhookStore  # noqa: E402
from postroom.worker.webhooks import Deliverer  # noqa: E402

SID = "profile"


def sent_document(n: int) -> dict[str, Any]:
    """A task document as ``email.sent`` carries it (its usual size)."""
    doc = new_document(f"task-{n:08d}-0000-0000-0000-000000000000", SID, time.time(),
                       {"order": f"A-{n}", "customer": "c-42"})  # fmt: skip
    doc.update(state="sent", attempts=1, result={
        "accepted": [f"user{n}@example.test"], "rejected": {},
        "response": "250 2.0.0 Ok: queued as 4F2A1B3C", "relay": "127.0.0.1:2525"})  # fmt: skip
    return doc


def redis_figures(client: redis.Redis) -> dict[str, float]:
    info = client.info("cpu")
    out = {"cpu": float(info["used_cpu_user"]) + float(info["used_cpu_sys"])}
    for name, stats in client.info("commandstats").items():
        out[f"{name.removeprefix('cmdstat_')}:calls"] = float(stats["calls"])
        out[f"{name.removeprefix('cmdstat_')}:usec"] = float(stats["usec"])
    return out


class Profiled:
    """cProfile in every thread that runs the deliverer's code (one profile each)."""

    def __init__(self) -> None:
        self.profiles: list[cProfile.Profile] = []
        self._lock = threading.Lock()

    def wrap(self, fn: Any) -> Any:
        local = threading.local()

        def run(*args: Any, **kwargs: Any) -> Any:
            prof = getattr(local, "prof", None)
            if prof is None:
                prof = local.prof = cProfile.Profile(time.thread_time)
                with self._lock:
                    self.profiles.append(prof)
            prof.enable()
            try:
                return fn(*args, **kwargs)
            finally:
                prof.disable()

        return run

    def report(self, top: int) -> str:
        out = io.StringIO()
        stats = pstats.Stats(self.profiles[0], stream=out)
        for prof in self.profiles[1:]:
            stats.add(prof)
        stats.sort_stats("tottime").print_stats(top)
        return out.getvalue()


def run(mode: str, n: int, rate: float, profile: bool, top: int) -> None:
    server = EmbeddedRedis().start()
    receiver = Receiver().start()
    deliverer: Deliverer | None = None
    try:
        client = redis.Redis.from_url(server.url)
        settings = Settings(redis_url=server.url, admin_token="x" * 32,
                            secret_key=generate_key(),
                            webhook_allow_hosts=("127.0.0.1",))  # fmt: skip
        WebhookStore(client, SecretBox(settings.secret_key)).create(
            SID, receiver.url, [events.EMAIL_SENT], None)
        emit = script("event_emit")
        producer = redis.Redis.from_url(server.url)

        def queue(k: int) -> None:
            script_keys, args = events.emit_args(SID, [(events.EMAIL_SENT, sent_document(k))])
            producer.eval(emit.source, len(script_keys), *script_keys, *args)

        deliverer = Deliverer(settings, redis.Redis.from_url(server.url))
        prof = Profiled() if profile else None
        if prof is not None:
            for name in ("_loop", "_deliver"):
                setattr(deliverer, name, prof.wrap(getattr(deliverer, name)))
        queue_cpu = 0.0
        if mode == "drain":
            for k in range(n):
                queue(k)
        client.config_resetstat()
        r0, recv0, me0 = redis_figures(client), cpu_seconds(receiver.proc.pid or 0), \
            time.process_time()  # fmt: skip
        sys0 = os.times().system
        base = receiver.stats()["unique"]
        started = time.time()
        deliverer.start()
        if mode == "trickle":
            t0 = time.thread_time()
            for k in range(n):
                queue(k)
                pause = started + (k + 1) / rate - time.time()
                if pause > 0:
                    time.sleep(pause)
            queue_cpu = time.thread_time() - t0
        stats = receiver.wait_unique(base + n, 300)
        elapsed = stats["last"] - started
        me = time.process_time() - me0 - queue_cpu
        kernel = os.times().system - sys0
        recv = cpu_seconds(receiver.proc.pid or 0) - recv0
        r1 = redis_figures(client)
        got = stats["unique"] - base
        print(f"== {mode}: {got:.0f} of {n} events" +
              (f" queued at {rate:.0f}/s" if mode == "trickle" else " queued at once") +
              f"; {got / max(elapsed, 1e-9):.0f} events/s")  # fmt: skip
        in_kernel = f" (in the kernel {kernel / n * 1e3:.3f})" if mode == "drain" else ""
        print(f"  CPU ms per event: deliverer {me / n * 1e3:.3f}{in_kernel}, redis "
              f"{(r1['cpu'] - r0['cpu']) / n * 1e3:.3f} (queuing included), receiver "
              f"{recv / n * 1e3:.3f}")  # fmt: skip
        for name in sorted({k.split(":")[0] for k in r1}):
            calls = r1.get(f"{name}:calls", 0) - r0.get(f"{name}:calls", 0)
            usec = r1.get(f"{name}:usec", 0) - r0.get(f"{name}:usec", 0)
            if calls and name not in ("info", "config|resetstat", "config"):
                print(f"  redis {name:<14} {calls / n:6.2f} per event, "
                      f"{usec / n:7.1f} us per event")
        if prof is not None:
            print(prof.report(top))
    finally:
        if deliverer is not None:
            deliverer.stop()
        receiver.stop()
        server.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=450.0, help="trickle: events per second")
    parser.add_argument("--modes", default="trickle,drain")
    parser.add_argument("--cprofile", action="store_true")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args(argv)
    print(f"profile_webhooks: {args.events} events; before: {load_avg()}; "
          f"pid {os.getpid()}; document {len(json.dumps(sent_document(0)))} bytes")
    for mode in args.modes.split(","):
        run(mode, args.events, args.rate, args.cprofile, args.top)
    print(f"after: {load_avg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
