"""Richer messages against plain ones, in one run: a 100 KiB attachment, a template.

    .venv/bin/python bench/bench_richer.py                      # rates, 1,000 messages a kind
    .venv/bin/python bench/bench_richer.py --messages 2000 --rounds 3
    .venv/bin/python bench/bench_richer.py --memory 5000        # RSS with 1 MiB attachments
    .venv/bin/python bench/bench_richer.py --in-process         # the intake's CPU alone

The same stack as ``bench_pipeline.py`` (embedded Redis, counting sink in a process of its
own, ``postroom api`` under gunicorn, ``postroom worker``). Rates: for each kind of message
(plain, template, 100 KiB attachment) and each round, in turns, the intake alone (the
workers paused: requests/s the API takes) and end to end (closed loop, workers running:
messages/s at the sink); each figure is printed with its ratio to the plain send of the
same round, and the medians at the end. ``--in-process``: the intake's own CPU per request
(Flask's test client, an embedded Redis, no HTTP server, no worker), the kinds in turns,
which the machine's noise disturbs less than the rates. Memory: ``--memory N`` posts N
messages, each with a 1 MiB attachment, at most ``--backlog`` of them accepted but not yet
at the sink, and samples the RSS of every process (as ``bench_memory.py``): the API and
the workers must stay flat; Redis holds the attachments only until their task is sent.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_pipeline  # noqa: E402
from bench_memory import Sampler, verdicts  # noqa: E402
from bench_pipeline import (  # noqa: E402
    ADMIN,
    HOST,
    SID,
    WARMUP,
    Options,
    PostroomStack,
    Sink,
    check_ids,
    load_avg,
    say,
)

KINDS = ("plain", "template", "attachment")
ATTACHMENT = base64.b64encode(os.urandom(100 * 1024)).decode()
TEMPLATE = {
    "subject": "Invoice {{ number }} for {{ name }}",
    "text": "Dear {{ name }},\n\nyour invoice {{ number }} of {{ total }} is ready.\n"
            "{% for item in items %}- {{ item.name }}: {{ item.price }}\n{% endfor %}",
    "html": "<p>Dear {{ name }},</p><p>invoice {{ number }}: {{ total }}</p><ul>"
            "{% for item in items %}<li>{{ item.name }}: {{ item.price }}</li>{% endfor %}</ul>",
}  # fmt: skip
_kind = "plain"
_big = ""


def body(n: int) -> bytes:
    """Message ``n`` of the kind being measured (``bench_pipeline`` posts what this gives)."""
    message: dict[str, object] = {"to": [f"rcpt-{n}@example.com"]}
    if _kind == "template":
        message.update(template="invoice", template_data={
            "number": n, "name": f"Customer {n}", "total": "12.50 EUR",
            "items": [{"name": f"item {i}", "price": f"{i}.00"} for i in range(5)]})  # fmt: skip
    else:
        message.update(subject=f"Bench message {n}",
                       text=f"Hello {n}. This is a benchmark message from the richer bench.")
    if _kind == "attachment":
        message["attachments"] = [{"filename": "report.pdf", "content": ATTACHMENT}]
    if _kind == "memory":
        message["attachments"] = [{"filename": "big.bin", "content": _big}]
    return json.dumps(message, separators=(",", ":")).encode()


bench_pipeline.message_body = body  # the load client (a forked process) posts these


def put_template(stack: PostroomStack) -> None:
    request = urllib.request.Request(
        f"http://{HOST}:{stack.api_port}/api/v1/solutions/{SID}/templates/invoice",
        data=json.dumps(TEMPLATE).encode(), method="PUT",
        headers={"Authorization": f"Bearer {ADMIN}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        assert answer.status in (200, 201)


def measure(stack: PostroomStack, sink: Sink, kind: str, first: int, m: int
            ) -> tuple[float, float]:  # fmt: skip
    """(intake alone req/s, end to end msg/s) for ``m`` messages of ``kind``."""
    global _kind
    _kind = kind
    sink.reset()
    for worker in stack.workers:
        os.killpg(worker.proc.pid, signal.SIGSTOP)
    try:
        alone = stack.post(first=first, count=m)
    finally:
        for worker in stack.workers:
            os.killpg(worker.proc.pid, signal.SIGCONT)
    sink.wait_count(m, 120 + m / 10)
    check(sink, m, alone.statuses, f"{kind} (intake alone)")
    sink.reset()
    e2e = stack.post(first=first + m, count=m)
    got, _, last = sink.wait_count(m, 120 + m / 10)
    check(sink, m, e2e.statuses, f"{kind} (end to end)")
    return alone.rate, got / max(last - e2e.started, 1e-9)


def check(sink: Sink, m: int, statuses: dict[int, int], label: str) -> None:
    line, _ = check_ids(sink, m, label)
    if statuses != {202: m} or "OK" not in line:
        raise RuntimeError(f"{label}: {statuses}; {line}")


def rates(args: argparse.Namespace, stack: PostroomStack, sink: Sink) -> None:
    put_template(stack)
    figures: dict[str, list[tuple[float, float]]] = {k: [] for k in KINDS}
    first = 0
    for round_ in range(args.rounds):
        order = KINDS[round_ % 3:] + KINDS[:round_ % 3]
        for kind in order:
            figures[kind].append(measure(stack, sink, kind, first, args.messages))
            first += 2 * args.messages
        plain = figures["plain"][-1]
        say(f"round {round_ + 1} ({', '.join(order)}), {load_avg()}")
        for kind in KINDS:
            intake, e2e = figures[kind][-1]
            say(f"  {kind:<11} intake alone {intake:7.0f} req/s ({intake / plain[0]:.2f}x plain)"
                f"   end to end {e2e:6.0f} msg/s ({e2e / plain[1]:.2f}x plain)")
    say(f"\nmedians of {args.rounds} rounds, {args.messages} messages a kind a round:")
    say("| kind | intake alone (req/s) | / plain | end to end (msg/s) | / plain |")
    say("|---|---|---|---|---|")
    for kind in KINDS:
        ratios_i = [k[0] / p[0] for k, p in zip(figures[kind], figures["plain"], strict=True)]
        ratios_e = [k[1] / p[1] for k, p in zip(figures[kind], figures["plain"], strict=True)]
        intake = statistics.median(f[0] for f in figures[kind])
        e2e = statistics.median(f[1] for f in figures[kind])
        say(f"| {kind} | {intake:.0f} | {statistics.median(ratios_i):.2f} | {e2e:.0f} | "
            f"{statistics.median(ratios_e):.2f} |")


def memory(args: argparse.Namespace, stack: PostroomStack, sink: Sink) -> bool:
    global _kind, _big
    _kind, _big = "memory", base64.b64encode(os.urandom(1024 * 1024)).decode()
    m, step = args.memory, 100
    sampler = Sampler(stack.parts(), args.interval)
    sampler.start()
    started = time.time()
    task_ids: list[str] = []
    for first in range(0, m, step):
        count = min(step, m - first)
        while first - sink.stats()[0] > args.backlog - count:
            stack.check_workers()
            time.sleep(0.05)
        task_ids.extend(stack.post(first=first, count=count).answers)
    got, _, last = sink.wait_count(m, 300 + m / 5)
    sampler.stop()
    say(f"{got} messages with a 1 MiB attachment in {last - started:.0f} s "
        f"= {got / (last - started):.1f} msg/s")
    line, _ = check_ids(sink, m, "sink")
    say(line)
    docs = stack.wait_sent(task_ids, 60)
    sent = sum(1 for d in docs if d is not None and d["state"] == "sent")
    assert stack.client is not None
    left = sum(1 for _ in stack.client.scan_iter("postroom:*:attachments:*"))
    say(f"task documents: {sent}/{m} sent; attachments left in Redis: {left}; redis "
        f"used_memory {stack.client.info('memory')['used_memory'] / 2**20:.0f} MiB")
    say("RSS after warm-up, first quarter -> last quarter (mean):")
    lines = verdicts(sampler) or ["  too few samples: send more messages"]
    for text in lines:
        say(text)
    return "OK" in line and sent == m and left == 0 and not any(
        "GROWS" in t and (" api " in t or " worker" in t) for t in lines)


def in_process(args: argparse.Namespace) -> None:
    """CPU and wall time per accepted request, per kind, in turns; medians and ratios."""
    global _kind
    from postroom.api.app import create_app
    from postroom.dev.embedded_redis import EmbeddedRedis
    from postroom.shared.crypto import generate_key
    from postroom.shared.settings import Settings

    server = EmbeddedRedis().start()
    try:
        settings = Settings(redis_url=server.url, admin_token=ADMIN, secret_key=generate_key(),
                            default_sender_domain="bench.localhost", log_level="WARNING")
        client = create_app(settings).test_client()
        admin = {"Authorization": f"Bearer {ADMIN}"}
        client.post("/api/v1/solutions", headers=admin,
                    json={"solution_id": SID, "hLimit": 1_000_000_000})
        client.put(f"/api/v1/solutions/{SID}/templates/invoice", json=TEMPLATE, headers=admin)
        path, headers = f"/api/v1/solutions/{SID}/email", {
            **admin, "Content-Type": "application/json"}  # fmt: skip
        cpu: dict[str, list[float]] = {k: [] for k in KINDS}
        first = 0
        store = redis.Redis.from_url(server.url)  # emptied of queued jobs between runs
        for round_ in range(args.rounds):
            for kind in KINDS[round_ % 3:] + KINDS[:round_ % 3]:
                _kind = kind
                bodies = [body(first + n) for n in range(args.messages)]
                first += args.messages
                for b in bodies[:50]:  # warm: compiled templates, connections
                    client.post(path, data=b, headers=headers)
                started = time.process_time()
                for b in bodies:
                    assert client.post(path, data=b, headers=headers).status_code == 202
                cpu[kind].append((time.process_time() - started) * 1000 / len(bodies))
                store.delete(*store.scan_iter("postroom:*:attachments:*"), "email")
        say(f"intake CPU per request, in process, medians of {args.rounds} rounds of "
            f"{args.messages}:")
        plain = statistics.median(cpu["plain"])
        for kind in KINDS:
            ms = statistics.median(cpu[kind])
            say(f"  {kind:<11} {ms:.3f} ms  ({ms / plain:.2f}x plain)")
    finally:
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=1000, help="per kind and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--memory", type=int, default=0,
                        help="messages with a 1 MiB attachment for the RSS check (0: rates)")
    parser.add_argument("--backlog", type=int, default=200, help="accepted, not yet sent")
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--in-process", action="store_true",
                        help="the intake's CPU per request, without HTTP or workers")
    args = parser.parse_args()
    if args.in_process:
        in_process(args)
        return 0
    options = Options(args.messages, args.concurrency, 1, None, None, 0.0, False)
    say(f"bench_richer; before: {load_avg()}")
    log_dir = Path(tempfile.mkdtemp(prefix="postroom-bench-richer-"))
    sink = Sink().start()
    stack = PostroomStack(sink, log_dir, options)
    ok = True
    try:
        stack.start()
        stack.post(first=10_000_000, count=WARMUP)
        sink.wait_count(WARMUP, 120)
        sink.reset()
        if args.memory:
            ok = memory(args, stack, sink)
        else:
            rates(args, stack, sink)
    finally:
        stack.stop()
        sink.stop()
    say(f"after: {load_avg()}")
    if ok:
        shutil.rmtree(log_dir, ignore_errors=True)
    else:
        say(f"logs kept in {log_dir}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
