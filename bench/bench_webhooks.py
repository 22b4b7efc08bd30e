"""What webhooks cost, in one run, on loopback: events per second delivered to a local
receiver, and the end-to-end send rate with one endpoint subscribed to ``email.sent``
(and with one that never answers) against the same pipeline without webhooks.

Run on purpose (a minute or two; not part of the test suite):

    .venv/bin/python bench/bench_webhooks.py --messages 2000 --repeat 3

Each round starts a fresh stack (``bench/bench_pipeline.py``'s: an embedded
``redis-server``, ``postroom api`` under gunicorn, one ``postroom worker`` at its default
pool size, a counting SMTP sink in a process of its own) for each of three systems, in
an order that turns from round to round:

- ``none``: no webhook endpoint;
- ``sent``: one endpoint subscribed to ``email.sent``, at a receiver in a process of its own
  (``http.server``, answers 204); the run also waits for every message's event and
  reports events/s (first request to the last event received);
- ``hang``: one endpoint subscribed to ``email.sent`` whose receiver never answers (each
  POST ends at ``POSTROOM_WEBHOOK_TIMEOUT_S``).

End-to-end is the first request to the sink's last message, as in ``bench_pipeline.py``.
Then, on the ``sent`` stack, ``--drain`` events queued at once (``webhook.test`` style,
straight into Redis) are timed to the receiver: the delivery rate alone. It prints each
figure and the ratios to ``none`` (medians over the rounds, lowest - highest), and the
ratio of CPU per message (all processes) without and with the endpoint: the rate ratio
to expect when the CPU is what limits, steadier than the rates on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_pipeline as bp  # noqa: E402

from postroom.dev.embedded_redis import free_port  # noqa: E402
from postroom.shared import events  # noqa: E402
from postroom.shared.scripts import script  # noqa: E402


def _receiver_main(port: int, hang: bool, conn: Connection) -> None:
    counts = {"n": 0, "first": 0.0, "last": 0.0}
    ids: set[str] = set()
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers.get("Content-Length", "0")))
            if hang:
                time.sleep(3600)
            now = time.time()
            with lock:
                counts["n"] += 1
                counts["first"] = counts["first"] or now
                counts["last"] = now
                ids.add(self.headers.get("webhook-id", ""))
            self.send_response(204)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_GET(self) -> None:  # noqa: N802
            with lock:
                body = json.dumps({**counts, "unique": len(ids)}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            return

    server = ThreadingHTTPServer((bp.HOST, port), Handler)
    server.daemon_threads = True
    conn.send("ready")
    server.serve_forever()


class Receiver:
    def __init__(self, hang: bool = False) -> None:
        self.port = free_port()
        parent, child = mp.Pipe()
        self._conn = parent
        self.proc = mp.Process(target=_receiver_main, args=(self.port, hang, child), daemon=True)

    def start(self) -> Receiver:
        self.proc.start()
        self._conn.recv()
        return self

    @property
    def url(self) -> str:
        return f"http://{bp.HOST}:{self.port}/hook"

    def stats(self) -> dict[str, float]:
        with urllib.request.urlopen(f"{self.url}?stats", timeout=5) as answer:
            stats: dict[str, float] = json.loads(answer.read())
        return stats

    def wait_unique(self, expected: int, timeout: float) -> dict[str, float]:
        deadline = time.monotonic() + timeout
        while True:
            stats = self.stats()
            if stats["unique"] >= expected or time.monotonic() > deadline:
                return stats
            time.sleep(0.05)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.join(5)


class WebhookStack(bp.PostroomStack):
    @property
    def env(self) -> dict[str, str]:
        return {**super().env, "POSTROOM_WEBHOOK_ALLOW_HOSTS": bp.HOST}

    def subscribe(self, url: str, kinds: list[str]) -> None:
        body = json.dumps({"url": url, "events": kinds}).encode()
        request = urllib.request.Request(
            f"http://{bp.HOST}:{self.api_port}/api/v1/solutions/{bp.SID}/webhooks", data=body,
            headers={"Authorization": f"Bearer {self.token}",
                     "Content-Type": "application/json"}, method="POST")  # fmt: skip
        with urllib.request.urlopen(request, timeout=10) as answer:
            assert answer.status == 201


def run(kind: str, sink: bp.Sink, log_dir: Path, options: bp.Options,
        drain: int) -> dict[str, float]:  # fmt: skip
    m = options.messages
    stack = WebhookStack(sink, log_dir, options)
    receiver = Receiver(hang=kind == "hang").start() if kind != "none" else None
    out: dict[str, float] = {}
    try:
        stack.start()
        if receiver is not None:
            stack.subscribe(receiver.url, ["email.sent"])
        sink.reset()
        stack.post(first=10_000_000, count=bp.WARMUP)
        sink.wait_count(bp.WARMUP, 120)
        stack.check_workers()
        if receiver is not None and kind == "sent":
            receiver.wait_unique(bp.WARMUP, 60)
        sink.reset()
        base = receiver.stats()["unique"] if receiver is not None and kind == "sent" else 0
        parts = stack.parts()
        if receiver is not None and receiver.proc.pid:
            parts.append(bp.Part("receiver", receiver.proc.pid))
        before = {p.name: p.cpu() for p in parts}
        intake = stack.post(first=0, count=m)
        count, _, last = sink.wait_count(m, bp.drain_timeout(m))
        out["e2e"] = count / max(last - intake.started, 1e-9)
        if receiver is not None and kind == "sent":
            receiver.wait_unique(base + m, 120)
        cpu = bp.cpu_per_message(parts, before, m)
        out["cpu_worker"] = sum(v for k, v in cpu.items() if k.startswith("worker"))
        out["cpu_total"] = sum(cpu.values())
        out["cpu_receiver"] = cpu.get("receiver", 0.0)
        line, _ = bp.check_ids(sink, m, kind)
        out["ok"] = 1.0 if "OK" in line else 0.0
        if receiver is not None and kind == "sent":
            stats = receiver.wait_unique(base + m, 120)
            out["events_e2e"] = (stats["unique"] - base) / max(stats["last"] - intake.started,
                                                               1e-9)
            assert stack.client is not None
            pipe = stack.client.pipeline(transaction=False)
            for n in range(drain):
                keys_, args = events.emit_args(bp.SID, [(events.EMAIL_SENT, {"n": n})])
                pipe.eval(script("event_emit").source, len(keys_), *keys_, *args)
            before = receiver.stats()["unique"]
            queued_at = time.time()
            pipe.execute()
            stats = receiver.wait_unique(before + drain, 120)
            out["events_drain"] = (stats["unique"] - before) / max(stats["last"] - queued_at,
                                                                   1e-9)
        return out
    finally:
        stack.stop()
        if receiver is not None:
            receiver.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--drain", type=int, default=2000, help="events queued at once")
    args = parser.parse_args(argv)
    options = bp.Options(messages=args.messages, concurrency=args.concurrency, workers=1,
                         worker_concurrency=None, api_workers=None, paced_seconds=0,
                         baselines=False)  # fmt: skip
    bp.say(f"bench_webhooks: {args.messages} messages per system, {args.repeat} rounds; "
           f"before: {bp.load_avg()}")
    log_dir = Path(tempfile.mkdtemp(prefix="postroom-bench-webhooks-"))
    kinds = ["none", "sent", "hang"]
    rounds: list[dict[str, dict[str, float]]] = []
    with bp.running_sink() as sink:
        for n in range(args.repeat):
            shift = n % len(kinds)
            figures = {k: run(k, sink, log_dir, options, args.drain)
                       for k in kinds[shift:] + kinds[:shift]}
            rounds.append(figures)
            bp.say(f"round {n + 1}: " + "; ".join(
                f"{k} e2e {f['e2e']:.0f} msg/s" + ("" if f["ok"] else " (sink check FAILED)")
                for k, f in figures.items())
                + f"; events {figures['sent']['events_e2e']:.0f}/s during the sends, "
                f"{figures['sent']['events_drain']:.0f}/s queued at once")  # fmt: skip

    def summary(name: str, values: list[float], unit: str = "") -> None:
        values = sorted(values)
        bp.say(f"  {name:<52} {statistics.median(values):8.2f}{unit} "
               f"({values[0]:.2f} - {values[-1]:.2f})")

    bp.say(f"\n== over {len(rounds)} rounds: median (lowest - highest); after: {bp.load_avg()}")
    summary("e2e msg/s, no webhooks", [r["none"]["e2e"] for r in rounds])
    summary("e2e msg/s, one endpoint on email.sent", [r["sent"]["e2e"] for r in rounds])
    summary("e2e msg/s, one endpoint that hangs", [r["hang"]["e2e"] for r in rounds])
    summary("ratio: with endpoint / without", [r["sent"]["e2e"] / r["none"]["e2e"]
                                               for r in rounds])
    summary("ratio: hanging endpoint / without", [r["hang"]["e2e"] / r["none"]["e2e"]
                                                  for r in rounds])
    for kind in kinds:
        summary(f"CPU ms per message, {kind}: workers",
                [r[kind]["cpu_worker"] for r in rounds])
        summary(f"CPU ms per message, {kind}: all (receiver included)",
                [r[kind]["cpu_total"] for r in rounds])
    # when the machine's CPU is what limits the pipeline, the rates go as the inverse of
    # the CPU per message: steadier than the rates on a shared machine (same rounds)
    summary("CPU ratio, all: without / with endpoint", [r["none"]["cpu_total"]
                                                        / r["sent"]["cpu_total"]
                                                        for r in rounds])  # fmt: skip
    summary("CPU ms per message, sent: the receiver alone",
            [r["sent"]["cpu_receiver"] for r in rounds])
    summary("events/s delivered during the sends", [r["sent"]["events_e2e"] for r in rounds])
    summary("events/s delivered, queued at once", [r["sent"]["events_drain"] for r in rounds])
    failed = any(not f["ok"] for r in rounds for f in r.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
