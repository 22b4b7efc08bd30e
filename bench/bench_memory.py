"""Does memory stay flat? Push many messages through the real pipeline, sampling RSS.

Run on purpose (100,000 messages take several minutes on 2 cores):

    .venv/bin/python bench/bench_memory.py                      # 100,000 messages
    .venv/bin/python bench/bench_memory.py --messages 20000     # shorter

The same stack as ``bench_pipeline.py`` (embedded Redis, counting sink in a process of its
own, ``postroom api`` under gunicorn, ``postroom worker``) takes the messages in batches,
with at most ``--backlog`` of them accepted but not yet at the sink, so the broker's queue
stays short and what grows is the processes, not the queue. Every ``--interval`` seconds
the resident set size (``VmRSS``) of every process is sampled. After the first tenth of the
samples (warm-up), the mean of the first quarter is compared with the mean of the last
quarter, per process: "flat" when it grew by less than 5 % + 2 MiB. Redis is expected to
grow: it keeps a task document and a ledger per message for ``POSTROOM_RESULT_TTL``.
At the end the sink must have received every message exactly once.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_pipeline import (  # noqa: E402
    WARMUP,
    Options,
    Part,
    PostroomStack,
    Sink,
    check_ids,
    describe,
    load_avg,
    rss_kib,
    say,
)

FLAT_RATIO = 1.05
FLAT_SLACK_KIB = 2048


class Sampler(threading.Thread):
    """Samples VmRSS of every process of the given parts every ``interval`` seconds."""

    def __init__(self, parts: list[Part], interval: float) -> None:
        super().__init__(daemon=True)
        self.parts = parts
        self.interval = interval
        self.samples: dict[tuple[str, int], list[tuple[float, int]]] = defaultdict(list)
        self.names: dict[tuple[str, int], str] = {}
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            now = time.monotonic()
            for part in self.parts:
                for pid in part.pids():
                    kib = rss_kib(pid)
                    if kib:
                        key = (part.name, pid)
                        self.samples[key].append((now, kib))
                        self.names.setdefault(key, describe(pid))

    def stop(self) -> None:
        self._halt.set()
        self.join(5)


def verdicts(sampler: Sampler) -> list[str]:
    lines = []
    for key, series in sorted(sampler.samples.items()):
        steady = series[len(series) // 10 :]
        if len(steady) < 8:
            continue
        quarter = len(steady) // 4
        first = sum(k for _, k in steady[:quarter]) / quarter
        last = sum(k for _, k in steady[-quarter:]) / quarter
        flat = last <= first * FLAT_RATIO + FLAT_SLACK_KIB
        name, pid = key
        verdict = "flat" if flat else "GROWS"
        if name == "redis" and not flat:
            verdict = "grows (stored documents and ledgers: expected)"
        elif name == "sink" and not flat:
            verdict = "grows (the bench's sink keeps every Message-ID: expected)"
        lines.append(
            f"  {name:<9} pid {pid:<7} {first / 1024:7.1f} -> {last / 1024:7.1f} MiB "
            f"({(last - first) / 1024:+6.1f}, peak {max(k for _, k in series) / 1024:.1f})  "
            f"{verdict:<6} {sampler.names[key]}"
        )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=1000, help="messages per load run")
    parser.add_argument("--backlog", type=int, default=3000, help="accepted, not yet sent")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between samples")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--worker-concurrency", type=int, default=None,
                        help="pool processes (default: the worker's own, one per CPU)")
    args = parser.parse_args()
    options = Options(args.messages, args.concurrency, args.workers, args.worker_concurrency,
                      None, 0.0, False)  # fmt: skip
    m = args.messages
    say(f"bench_memory: {m} messages; before: {load_avg()}")
    log_dir = Path(tempfile.mkdtemp(prefix="postroom-bench-memory-"))
    sink = Sink().start()
    stack = PostroomStack(sink, log_dir, options)
    try:
        stack.start()
        stack.post(first=10_000_000, count=WARMUP)
        sink.wait_count(WARMUP, 120)
        sink.reset()
        sampler = Sampler(stack.parts(), args.interval)
        sampler.start()
        task_ids: list[str] = []
        statuses: dict[int, int] = defaultdict(int)
        started = time.time()
        next_report = time.monotonic() + 30
        for first in range(0, m, args.batch):
            count = min(args.batch, m - first)
            while first - sink.stats()[0] > args.backlog - count:
                stack.check_workers()
                time.sleep(0.05)
            load = stack.post(first=first, count=count)
            task_ids.extend(load.answers)
            for status, n in load.statuses.items():
                statuses[status] += n
            if time.monotonic() > next_report:
                done = sink.stats()[0]
                say(f"  {done} sent, {done / (time.time() - started):.0f} msg/s, {load_avg()}")
                next_report += 30
        got, _, last = sink.wait_count(m, 120 + m / 50)
        sampler.stop()
        say(f"\n{got} messages in {last - started:.0f} s = {got / (last - started):.0f} msg/s; "
            f"HTTP answers {dict(statuses)}")  # fmt: skip
        line, _ = check_ids(sink, m, "sink")
        say(line)
        docs = stack.wait_sent(task_ids, 60)
        sent = sum(1 for d in docs if d is not None and d["state"] == "sent")
        say(f"task documents: {sent}/{m} sent")
        assert stack.client is not None
        used = stack.client.info("memory")["used_memory"]
        say(f"redis used_memory {used / 2**20:.0f} MiB (documents, ledgers, queue)")
        say("\nRSS after warm-up, first quarter -> last quarter (mean):")
        for text in verdicts(sampler) or ["  too few samples: send more messages"]:
            say(text)
        say(f"\nafter: {load_avg()}")
        ok = "OK" in line and sent == m
        if ok:
            shutil.rmtree(log_dir, ignore_errors=True)
        else:
            say(f"logs kept in {log_dir}")
        return 0 if ok else 1
    finally:
        stack.stop()
        sink.stop()


if __name__ == "__main__":
    sys.exit(main())
