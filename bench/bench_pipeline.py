"""End-to-end throughput of postroom against two baselines, in one run, on loopback.

Run on purpose (a few minutes; not part of the test suite):

    .venv/bin/python bench/bench_pipeline.py                 # 5,000 messages per system
    .venv/bin/python bench/bench_pipeline.py --quick         # 500, to see that it works
    .venv/bin/python bench/bench_pipeline.py --messages 20000 --concurrency 32 \\
        --workers 2 --worker-concurrency 2

What runs: an embedded ``redis-server`` of its own, an aiosmtpd sink in a process of its own
(it counts messages and their Message-IDs; its CPU is not in the client's GIL), ``postroom
api`` under gunicorn and ``postroom worker`` processes, started as the service starts them
(``python -m postroom.cli ...`` with ``POSTROOM_*`` variables). A load client in a process of
its own (asyncio, raw HTTP/1.1) posts the messages.

For postroom it prints: end-to-end messages/s (first request to the sink's last message),
intake requests/s with p50/p99 latency (closed loop, ``--concurrency`` requests in flight),
intake latency p50/p99 at half that rate (an open-loop paced run: latency counts from each
request's scheduled time), intake with the workers paused and how fast they drain the
backlog it leaves (with their CPU per message meanwhile), CPU per message of each part, and
peak RSS (``VmHWM``) of every process. ``--api-args`` passes options to ``postroom api``
(``--api-args '--worker-class gthread --threads 1'``). The same figures follow for (a) a
naive Flask endpoint that sends synchronously with smtplib under gunicorn -w 4
(``bench/baseline_naive_app.py``) and (b) nodemailer's pooled transport with one
connection (``bench/baseline_nodemailer.js``, installed with npm into a temporary folder),
then the ratios. Every run checks that the sink received exactly
the messages sent, each once (distinct Message-IDs), and that every postroom task document
says ``sent`` with the Message-ID the sink saw.

``--batch N`` posts postroom's messages N per request on the batch route
(``POST /solutions/{sid}/email/batch``), as a client holding several messages would; the
baselines still send one message per request (nodemailer's client has no HTTP leg at all).

The machine's load average is printed before and after: other work on the machine changes
every figure here. ``--repeat N`` runs N rounds, each starting with another system, and
prints the median of each ratio (a shared machine's speed drifts from one minute to the
next; a single round can favour either side).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from postroom.dev.embedded_redis import EmbeddedRedis, free_port  # noqa: E402
from postroom.shared import keys  # noqa: E402
from postroom.shared.crypto import generate_key  # noqa: E402

HOST = "127.0.0.1"
SID = "bench"
ADMIN = "bench-admin-token"
SENDER_DOMAIN = "bench.postroom.localhost"
CLK_TCK = os.sysconf("SC_CLK_TCK")
WARMUP = 40


def say(text: str = "") -> None:
    print(text, flush=True)


def load_avg() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} ({os.cpu_count()} cores)"


# -- the sink: a process of its own ------------------------------------------------------

_MESSAGE_ID = re.compile(rb"^message-id:[ \t]*(<[^>\r\n]*>)", re.IGNORECASE | re.MULTILINE)


class _CountingHandler:
    """aiosmtpd handler: counts messages, keeps their Message-IDs and the time of the
    first and last one; stores nothing else."""

    def __init__(self, pipelining: bool = False) -> None:
        self.pipelining = pipelining
        self.reset()

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        if self.pipelining:  # RFC 2920, as Postfix and most relays offer it
            responses.insert(len(responses) - 1, "250-PIPELINING")
        return responses

    def reset(self) -> None:
        self.count = 0
        self.first = 0.0
        self.last = 0.0
        self.ids: list[bytes] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        content: bytes = envelope.content or b""
        end = content.find(b"\r\n\r\n")
        found = _MESSAGE_ID.search(content, 0, end if end >= 0 else len(content))
        now = time.time()
        if not self.count:
            self.first = now
        self.count += 1
        self.last = now
        self.ids.append(found.group(1) if found else b"")
        return "250 2.0.0 Ok: queued"


def _sink_main(port: int, conn: Connection, pipelining: bool) -> None:
    from aiosmtpd.controller import Controller

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    handler = _CountingHandler(pipelining)
    controller = Controller(
        handler, hostname=HOST, port=port, server_hostname="bench-sink.localhost"
    )
    controller.start()
    conn.send("ready")
    while True:
        command = conn.recv()
        if command == "stats":
            conn.send((handler.count, handler.first, handler.last))
        elif command == "ids":
            conn.send(handler.ids)
        elif command == "reset":
            handler.reset()
            conn.send("ok")
        elif command == "stop":
            controller.stop()
            conn.send("ok")
            return


class Sink:
    """The counting SMTP sink, in a process of its own; with ``pipelining`` its EHLO reply
    offers PIPELINING."""

    def __init__(self, pipelining: bool = False) -> None:
        self.port = free_port()
        self._conn, child = mp.Pipe()
        self.proc = mp.Process(target=_sink_main, args=(self.port, child, pipelining),
                               daemon=True)  # fmt: skip

    def start(self) -> Sink:
        self.proc.start()
        if self._conn.recv() != "ready":
            raise RuntimeError("the sink did not start")
        return self

    def _ask(self, command: str) -> Any:
        self._conn.send(command)
        return self._conn.recv()

    def stats(self) -> tuple[int, float, float]:
        count, first, last = self._ask("stats")
        return int(count), float(first), float(last)

    def ids(self) -> list[bytes]:
        ids: list[bytes] = self._ask("ids")
        return ids

    def reset(self) -> None:
        self._ask("reset")

    def wait_count(self, expected: int, timeout: float) -> tuple[int, float, float]:
        deadline = time.monotonic() + timeout
        while True:
            count, first, last = self.stats()
            if count >= expected or time.monotonic() > deadline:
                return count, first, last
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.is_alive():
            with contextlib.suppress(OSError, EOFError):
                self._ask("stop")
            self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()


# -- the load client: a process of its own ------------------------------------------------


@dataclass
class Load:
    """One load run as the client saw it."""

    started: float  # time.time() of the first request
    finished: float  # time.time() of the last answer
    latencies: list[float]  # seconds, in completion order
    statuses: dict[int, int]  # HTTP status -> count (0: connection error)
    answers: list[str]  # task_id (postroom) or messageId (naive), per 2xx answer

    @property
    def count(self) -> int:
        return sum(self.statuses.values())

    @property
    def rate(self) -> float:
        return self.count / max(self.finished - self.started, 1e-9)

    def percentile(self, p: float) -> float:
        ordered = sorted(self.latencies)
        if not ordered:
            return float("nan")
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def message_body(n: int) -> bytes:
    return json.dumps(
        {
            "to": [f"rcpt-{n}@example.com"],
            "subject": f"Bench message {n}",
            "text": f"Hello {n}. This is a benchmark message from the postroom pipeline bench.",
        },
        separators=(",", ":"),
    ).encode()


def batch_body(first: int, request: int, batch: int, count: int) -> bytes:
    """Request ``request`` of a batched load: messages ``first + request * batch`` on, at
    most ``batch`` of them and none past ``count``."""
    start = request * batch
    numbers = range(first + start, first + min(count, start + batch))
    messages = ",".join(message_body(n).decode() for n in numbers)
    return f'{{"messages":[{messages}]}}'.encode()


def _request(path: str, token: str, body: bytes) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    status_line = await reader.readuntil(b"\r\n")
    status = int(status_line.split()[1])
    head = await reader.readuntil(b"\r\n\r\n")
    length, close = 0, False
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"connection" and value.strip().lower() == b"close":
            close = True
    body = await reader.readexactly(length) if length else b""
    return status, body, close


async def _load(
    port: int,
    path: str,
    token: str,
    first: int,
    count: int,
    concurrency: int,
    rate: float | None,
    answer_field: str,
    batch: int = 0,
) -> Load:
    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    answers: list[str] = []
    index = iter(range(-(-count // batch) if batch else count))
    start_mono = loop.time() + 0.05
    started = time.time() + 0.05

    async def lane() -> None:
        reader: asyncio.StreamReader | None = None
        writer: asyncio.StreamWriter | None = None
        for i in index:
            scheduled = start_mono + (i / rate if rate else 0.0)
            delay = scheduled - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            begin = scheduled if rate else loop.time()
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection(HOST, port)
                assert reader is not None
                body = batch_body(first, i, batch, count) if batch else message_body(first + i)
                writer.write(_request(path, token, body))
                status, body, close = await _read_response(reader)
            except (OSError, asyncio.IncompleteReadError, ValueError):
                statuses[0] += 1
                if writer is not None:
                    writer.close()
                reader = writer = None
                continue
            latencies.append(loop.time() - begin)
            statuses[status] += 1
            if 200 <= status < 300 and batch:
                results = json.loads(body)["results"]
                answers.extend(str(x[answer_field]) for x in results if x["status"] == 202)
            elif 200 <= status < 300:
                answers.append(str(json.loads(body)[answer_field]))
            if close:
                writer.close()
                reader = writer = None
        if writer is not None:
            writer.close()

    await asyncio.gather(*(lane() for _ in range(concurrency)))
    return Load(started, time.time(), latencies, dict(statuses), answers)


def _client_main(conn: Connection, args: tuple[Any, ...]) -> None:
    conn.send(asyncio.run(_load(*args)))


def run_load(
    port: int,
    path: str,
    token: str,
    *,
    first: int,
    count: int,
    concurrency: int,
    rate: float | None = None,
    answer_field: str = "task_id",
    batch: int = 0,
) -> Load:
    """Post ``count`` messages from a client process: closed loop, or paced at ``rate``
    requests/s; with ``batch``, ``batch`` messages per request (the batch route)."""
    parent, child = mp.Pipe()
    args = (port, path, token, first, count, concurrency, rate, answer_field, batch)
    proc = mp.Process(target=_client_main, args=(child, args))
    proc.start()
    load: Load = parent.recv()
    proc.join()
    return load


# -- processes: start, measure, stop -------------------------------------------------------


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    return children


def process_tree(root: int) -> list[int]:
    children = _children_map()
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _status_kib(pid: int, name: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def peak_rss_kib(pid: int) -> int:
    return _status_kib(pid, "VmHWM")


def rss_kib(pid: int) -> int:
    return _status_kib(pid, "VmRSS")


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def describe(pid: int) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    words = [a.decode(errors="replace") for a in argv if a]
    text = " ".join(Path(words[0]).name if i == 0 else w for i, w in enumerate(words))
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass
class Part:
    """A named process tree of the system under test."""

    name: str
    pid: int

    def pids(self) -> list[int]:
        return process_tree(self.pid)

    def cpu(self) -> float:
        return sum(cpu_seconds(p) for p in self.pids())


@dataclass
class Spawned:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def part(self) -> Part:
        return Part(self.name, self.proc.pid)


def spawn(name: str, argv: list[str], env: dict[str, str], log_dir: Path) -> Spawned:
    log = log_dir / f"{name}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            argv, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    return Spawned(name, proc, log)


def stop(spawned: Spawned, timeout: float = 15.0) -> None:
    proc = spawned.proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # the group we started: pool children, workers
    proc.wait()


def wait_http(url: str, spawned: Spawned, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if spawned.proc.poll() is not None:
            raise RuntimeError(f"{spawned.name} exited; see {spawned.log}")
        try:
            with urllib.request.urlopen(url, timeout=1) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{spawned.name} did not answer {url}; see {spawned.log}")


# -- report helpers ------------------------------------------------------------------------


@dataclass
class Figures:
    """What one system did in one run."""

    name: str
    e2e: float  # messages/s, first request to the last message at the sink
    intake: Load | None = None
    paced: Load | None = None
    paced_rate: float = 0.0
    intake_alone: Load | None = None  # postroom: the API alone, its workers paused
    intake_alone_cpu_ms: float = 0.0  # the API's (and Redis's) CPU per request meanwhile
    batch: int = 0  # postroom: messages per request (the batch route), 0: one
    drain: float = 0.0  # postroom: messages/s as the resumed workers drain that backlog
    drain_cpu_ms: float = 0.0  # the workers' CPU per message meanwhile
    cpu_ms: dict[str, float] = field(default_factory=dict)  # per message, per part
    peak_rss: list[tuple[str, int, str]] = field(default_factory=list)  # (part, KiB, what)
    checks: list[str] = field(default_factory=list)


def snapshot_rss(parts: list[Part]) -> list[tuple[str, int, str]]:
    rows = []
    for part in parts:
        for pid in part.pids():
            kib = peak_rss_kib(pid)
            if kib:
                rows.append((part.name, kib, describe(pid)))
    return rows


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def intake_line(label: str, load: Load) -> str:
    """``label``, rate and latency of a closed-loop load, the rate in a fixed column."""
    return (
        f"  {label} {load.rate:{27 - len(label)}.0f} req/s   p50 {ms(load.percentile(50))}"
        f"   p99 {ms(load.percentile(99))}   statuses {load.statuses}"
    )


def print_figures(fig: Figures) -> None:
    say(f"\n== {fig.name}")
    say(f"  end to end          {fig.e2e:8.0f} msg/s")
    per = f"{fig.batch} messages per request: " if fig.batch else ""
    if fig.intake is not None:
        load = fig.intake
        line = intake_line("intake, closed loop", load)
        say(line + (f"   ({per}{load.rate * fig.batch:.0f} msg/s)" if fig.batch else ""))
    if fig.intake_alone is not None:
        alone = fig.intake_alone
        say(intake_line("intake, workers paused", alone)
            + (f"   ({per}{alone.rate * fig.batch:.0f} msg/s)" if fig.batch else "")
            + f"   (API and Redis CPU {fig.intake_alone_cpu_ms:.2f} ms per request)")
    if fig.drain:
        say(f"  backlog drained     {fig.drain:8.0f} msg/s   (workers' CPU "
            f"{fig.drain_cpu_ms:.2f} ms per message)")
    if fig.paced is not None:
        load = fig.paced
        say(
            f"  intake at {fig.paced_rate:.0f} req/s (half) p50 {ms(load.percentile(50))}"
            f"   p99 {ms(load.percentile(99))}   ({load.count} requests, {load.statuses})"
        )
    if fig.cpu_ms:
        parts = ", ".join(f"{k} {v:.2f}" for k, v in fig.cpu_ms.items())
        say(f"  CPU ms per message  {parts} (total {sum(fig.cpu_ms.values()):.2f})")
    if fig.peak_rss:
        total = sum(kib for _, kib, _ in fig.peak_rss)
        say(f"  peak RSS (VmHWM)    {total / 1024:.0f} MiB over {len(fig.peak_rss)} processes")
        for part, kib, what in fig.peak_rss:
            say(f"    {part:<10} {kib / 1024:7.1f} MiB  {what}")
    for line in fig.checks:
        say(f"  check               {line}")


def check_ids(sink: Sink, expected: int, label: str) -> tuple[str, set[bytes]]:
    ids = sink.ids()
    distinct = set(ids)
    ok = len(ids) == expected and len(distinct) == expected and b"" not in distinct
    verdict = "OK" if ok else "FAILED"
    line = (
        f"{label}: sink got {len(ids)} messages, {len(distinct)} distinct Message-IDs, "
        f"expected {expected}: {verdict}"
    )
    return line, distinct


def cpu_per_message(parts: list[Part], before: dict[str, float], count: int) -> dict[str, float]:
    return {p.name: (p.cpu() - before[p.name]) * 1000 / max(count, 1) for p in parts}


# -- postroom ------------------------------------------------------------------------------


@dataclass
class Options:
    messages: int
    concurrency: int
    workers: int
    worker_concurrency: int | None
    api_workers: int | None
    paced_seconds: float
    baselines: bool
    api_args: tuple[str, ...] = ()
    repeat: int = 1
    batch: int = 0  # messages per request on the batch route; 0: one per request
    sink_pipelining: bool = False  # the sink offers PIPELINING


class PostroomStack:
    """Redis, the API and the workers, as ``postroom api`` / ``postroom worker`` run."""

    def __init__(self, sink: Sink, log_dir: Path, options: Options) -> None:
        self.sink = sink
        self.log_dir = log_dir
        self.options = options
        self.redis = EmbeddedRedis()
        self.api_port = free_port()
        self.api: Spawned | None = None
        self.workers: list[Spawned] = []
        self.token = ""
        self.client: redis.Redis | None = None

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("POSTROOM_")}
        env.update(
            POSTROOM_REDIS_URL=self.redis.url,
            POSTROOM_ADMIN_TOKEN=ADMIN,
            POSTROOM_SECRET_KEY=self._key,
            POSTROOM_DEFAULT_SMTP_URL=f"smtp+plain://{HOST}:{self.sink.port}",
            POSTROOM_DEFAULT_SENDER_DOMAIN=SENDER_DOMAIN,
            POSTROOM_SMTP_ALLOW_HOSTS=HOST,
            POSTROOM_LOG_LEVEL="WARNING",
            PYTHONPATH=str(ROOT),
        )
        return env

    def start(self) -> PostroomStack:
        self._key = generate_key()
        self.redis.start()
        self.client = redis.Redis.from_url(self.redis.url)
        cli = [sys.executable, "-m", "postroom.cli"]
        api_argv = [*cli, "api", "--bind", f"{HOST}:{self.api_port}"]
        if self.options.api_workers:
            api_argv += ["--workers", str(self.options.api_workers)]
        api_argv += self.options.api_args
        self.api = spawn("api", api_argv, self.env, self.log_dir)
        wait_http(f"http://{HOST}:{self.api_port}/api/v1/solution/health", self.api)
        self.token = self._create_solution()
        for n in range(self.options.workers):
            argv = [*cli, "worker", "--hostname", f"bench{n + 1}@%h"]
            if self.options.worker_concurrency:
                argv += ["--concurrency", str(self.options.worker_concurrency)]
            self.workers.append(spawn(f"worker{n + 1}", argv, self.env, self.log_dir))
        return self

    def _create_solution(self) -> str:
        body = json.dumps({"solution_id": SID, "hLimit": 1_000_000_000}).encode()
        request = urllib.request.Request(
            f"http://{HOST}:{self.api_port}/api/v1/solutions",
            data=body,
            headers={"Authorization": f"Bearer {ADMIN}", "Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10) as answer:
            token: str = json.loads(answer.read())["token"]
        return token

    def parts(self) -> list[Part]:
        assert self.api is not None and self.redis.proc is not None
        parts = [self.api.part(), *(w.part() for w in self.workers)]
        parts.append(Part("redis", self.redis.proc.pid))
        parts.append(Part("sink", self.sink.proc.pid or 0))
        return parts

    def post(self, first: int, count: int, rate: float | None = None) -> Load:
        batch = self.options.batch
        return run_load(
            self.api_port,
            f"/api/v1/solutions/{SID}/email" + ("/batch" if batch else ""),
            self.token,
            first=first,
            count=count,
            concurrency=self.options.concurrency,
            rate=rate,
            batch=batch,
        )

    def documents(self, task_ids: list[str]) -> list[dict[str, Any] | None]:
        assert self.client is not None
        docs: list[dict[str, Any] | None] = []
        for i in range(0, len(task_ids), 1000):
            batch = [keys.task(SID, t) for t in task_ids[i : i + 1000]]
            docs.extend(json.loads(raw) if raw else None for raw in self.client.mget(batch))
        return docs

    def wait_sent(self, task_ids: list[str], timeout: float) -> list[dict[str, Any] | None]:
        deadline = time.monotonic() + timeout
        while True:
            docs = self.documents(task_ids)
            if all(d is not None and d["state"] == "sent" for d in docs):
                return docs
            if time.monotonic() > deadline:
                return docs
            time.sleep(0.2)

    def check_workers(self) -> None:
        for worker in self.workers:
            if worker.proc.poll() is not None:
                raise RuntimeError(f"{worker.name} exited; see {worker.log}")

    def stop(self) -> None:
        for spawned in [*self.workers, *([self.api] if self.api else [])]:
            stop(spawned)
        if self.client is not None:
            self.client.close()
        self.redis.cleanup()


def drain_timeout(count: int) -> float:
    return 60.0 + count / 20.0


def run_postroom(sink: Sink, log_dir: Path, options: Options) -> Figures:
    m = options.messages
    stack = PostroomStack(sink, log_dir, options)
    try:
        stack.start()
        # warm up: every gunicorn worker, every pool child, every connection
        sink.reset()
        warm = stack.post(first=10_000_000, count=WARMUP)
        sink.wait_count(WARMUP, 120)
        stack.check_workers()
        if sink.stats()[0] < WARMUP:
            raise RuntimeError(f"warm-up messages did not arrive: {warm.statuses}")
        sink.reset()
        parts = stack.parts()

        before = {p.name: p.cpu() for p in parts}
        intake = stack.post(first=0, count=m)
        count, _, last = sink.wait_count(m, drain_timeout(m))
        cpu = cpu_per_message(parts, before, m)
        e2e = count / max(last - intake.started, 1e-9)
        name = "postroom (Flask + Celery + Redis, durable)"
        if options.api_args:
            name = f"postroom (Flask + Celery + Redis, durable; api {' '.join(options.api_args)})"
        if options.batch:
            name = name[:-1] + f"; batches of {options.batch})"
        fig = Figures(name, e2e, intake=intake, cpu_ms=cpu, batch=options.batch)
        expected = f"{-(-m // options.batch)} x 200" if options.batch else f"{m} x 202"
        fig.checks.append(f"HTTP answers: {intake.statuses} (expected {expected})")
        line, seen = check_ids(sink, m, "closed-loop run")
        docs = stack.wait_sent(intake.answers, 60)
        sent = [d for d in docs if d is not None and d["state"] == "sent"]
        doc_ids = {d["result"]["messageId"].encode() for d in sent}
        fig.checks.append(line)
        verdict = "OK" if len(sent) == m and doc_ids == seen else "FAILED"
        fig.checks.append(
            f"task documents: {len(sent)}/{len(docs)} sent, Message-IDs match the sink's: "
            f"{doc_ids == seen}: {verdict}"
        )

        # half the measured intake capacity, paced
        sink.reset()
        fig.paced_rate = intake.rate / 2
        n = max(50, min(m, int(fig.paced_rate * options.paced_seconds) * max(1, options.batch)))
        fig.paced = stack.post(first=m, count=n, rate=fig.paced_rate)
        sink.wait_count(n, drain_timeout(n))
        line, _ = check_ids(sink, n, "paced run")
        fig.checks.append(line)
        docs = stack.wait_sent(fig.paced.answers, 60)
        sent_n = sum(1 for d in docs if d is not None and d["state"] == "sent")
        fig.checks.append(f"paced task documents: {sent_n}/{n} sent")

        # the API's own capacity: the same burst with the workers paused (SIGSTOP), as
        # when sends come faster than the workers drain and the queue absorbs them
        sink.reset()
        for worker in stack.workers:
            os.killpg(worker.proc.pid, signal.SIGSTOP)
        serving = [p for p in parts if p.name in ("api", "redis")]
        before_alone = sum(p.cpu() for p in serving)
        try:
            fig.intake_alone = stack.post(first=m + n, count=m)
            spent = sum(p.cpu() for p in serving) - before_alone
            fig.intake_alone_cpu_ms = spent * 1000 / fig.intake_alone.count
        finally:
            # the backlog those requests left: how fast the workers drain it, as a batch
            # consumer sees it (every pool process busy, messages waiting)
            workers = [p for p in parts if p.name.startswith("worker")]
            before_drain = sum(p.cpu() for p in workers)
            resumed = time.time()
            for worker in stack.workers:
                os.killpg(worker.proc.pid, signal.SIGCONT)
        drained, _, last = sink.wait_count(m, drain_timeout(m))
        fig.drain = drained / max(last - resumed, 1e-9)
        fig.drain_cpu_ms = (sum(p.cpu() for p in workers) - before_drain) * 1000 / max(drained, 1)
        line, _ = check_ids(sink, m, "workers-paused run")
        fig.checks.append(line)
        fig.peak_rss = snapshot_rss(parts)
        return fig
    finally:
        stack.stop()


# -- baselines -----------------------------------------------------------------------------


def run_naive(sink: Sink, log_dir: Path, options: Options) -> Figures:
    m = options.messages
    port = free_port()
    env = {**os.environ, "BENCH_SMTP_PORT": str(sink.port), "BENCH_SMTP_HOST": HOST}
    argv = [sys.executable, "-m", "gunicorn", "-w", "4", "--bind", f"{HOST}:{port}",
            "--chdir", str(ROOT / "bench"), "--no-control-socket", "--log-level", "warning",
            "baseline_naive_app:app"]  # fmt: skip
    app = spawn("naive", argv, env, log_dir)
    try:
        wait_tcp(port, app)
        sink.reset()
        run_load(port, "/send", "-", first=20_000_000, count=WARMUP, concurrency=4,
                 answer_field="messageId")  # fmt: skip
        sink.wait_count(WARMUP, 30)
        sink.reset()
        parts = [app.part(), Part("sink", sink.proc.pid or 0)]
        before = {p.name: p.cpu() for p in parts}
        intake = run_load(port, "/send", "-", first=0, count=m,
                          concurrency=options.concurrency, answer_field="messageId")  # fmt: skip
        count, _, last = sink.wait_count(m, 30)
        fig = Figures("naive Flask + smtplib (gunicorn -w 4, synchronous)",
                      count / max(last - intake.started, 1e-9), intake=intake)  # fmt: skip
        fig.cpu_ms = cpu_per_message(parts, before, m)
        fig.checks.append(f"HTTP answers: {intake.statuses} (expected {m} x 200)")
        fig.checks.append(check_ids(sink, m, "closed-loop run")[0])
        sink.reset()
        fig.paced_rate = intake.rate / 2
        n = max(50, min(m, int(fig.paced_rate * options.paced_seconds)))
        fig.paced = run_load(port, "/send", "-", first=m, count=n, concurrency=options.concurrency,
                             rate=fig.paced_rate, answer_field="messageId")  # fmt: skip
        sink.wait_count(n, 30)
        fig.checks.append(check_ids(sink, n, "paced run")[0])
        fig.peak_rss = snapshot_rss(parts)
        return fig
    finally:
        stop(app)


def wait_tcp(port: int, spawned: Spawned, timeout: float = 30.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if spawned.proc.poll() is not None:
            raise RuntimeError(f"{spawned.name} exited; see {spawned.log}")
        with socket.socket() as s:
            if s.connect_ex((HOST, port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{spawned.name} did not listen on {port}")


def run_nodemailer(sink: Sink, log_dir: Path, options: Options) -> Figures | None:
    m = options.messages
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        say("nodemailer baseline skipped: node or npm not found")
        return None
    with tempfile.TemporaryDirectory(prefix="postroom-bench-npm-") as folder:
        install = subprocess.run(
            [npm, "install", "--prefix", folder, "--no-audit", "--no-fund", "--silent",
             "nodemailer"],
            capture_output=True, text=True, check=False, timeout=300,
        )  # fmt: skip
        if install.returncode != 0:
            say(f"nodemailer baseline skipped: npm install failed: {install.stderr[-500:]}")
            return None
        env = {**os.environ, "NODE_PATH": str(Path(folder) / "node_modules")}
        script = str(ROOT / "bench" / "baseline_nodemailer.js")

        def run(count: int) -> dict[str, Any]:
            done = subprocess.run(
                [node, script, str(sink.port), str(count), str(options.concurrency)],
                capture_output=True, text=True, env=env, check=True, timeout=600,
            )  # fmt: skip
            result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
            return result

        sink.reset()
        run(WARMUP)
        sink.reset()
        sink_before = cpu_seconds(sink.proc.pid or 0)
        result = run(m)
        count, _, last = sink.wait_count(m, 30)
        e2e = count / max(last - result["start"] / 1000, 1e-9)
        fig = Figures("nodemailer, pooled transport, 1 connection", e2e)
        fig.cpu_ms = {
            "node": float(result["cpu_ms"]) / m,
            "sink": (cpu_seconds(sink.proc.pid or 0) - sink_before) * 1000 / m,
        }
        fig.checks.append(f"sendMail: {result['sent']} sent, {result['errors']} errors")
        fig.checks.append(check_ids(sink, m, "run")[0])
        fig.peak_rss = [("node", int(result["peak_rss_kib"]), "node baseline_nodemailer.js")]
        return fig


# -- main ---------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=None, help="per system (default 5000)")
    parser.add_argument("--concurrency", type=int, default=16, help="HTTP requests in flight")
    parser.add_argument("--workers", type=int, default=1, help="postroom worker processes")
    parser.add_argument("--worker-concurrency", type=int, default=None,
                        help="pool processes of each (default: the worker's own, Celery's: one per "
                             "CPU)")  # fmt: skip
    parser.add_argument("--api-workers", type=int, default=None,
                        help="gunicorn workers of postroom api (default: its own, 2 x cores)")
    parser.add_argument("--paced-seconds", type=float, default=None,
                        help="length of the paced run (default 10 s)")  # fmt: skip
    parser.add_argument("--no-baselines", action="store_true", help="postroom only")
    parser.add_argument("--api-args", default="",
                        help="more options for `postroom api`, e.g. '--worker-class gthread "
                             "--threads 4' (gunicorn's own pass through)")  # fmt: skip
    parser.add_argument("--batch", type=int, default=0, metavar="N",
                        help="postroom: N messages per request on the batch route "
                             "(POST .../email/batch); the baselines send one each")  # fmt: skip
    parser.add_argument("--sink-pipelining", action="store_true",
                        help="the sink offers PIPELINING (RFC 2920), as most relays do: "
                             "postroom and nodemailer then pipeline each envelope; the naive "
                             "view's smtplib does not")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="500 messages, 3 s paced runs")
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds of all systems, each starting with another; the median "
                             "of each ratio is printed at the end")  # fmt: skip
    args = parser.parse_args(argv)
    messages = args.messages or (500 if args.quick else 5000)
    paced = args.paced_seconds or (3.0 if args.quick else 10.0)
    return Options(messages, args.concurrency, args.workers, args.worker_concurrency,
                   args.api_workers, paced, not args.no_baselines,
                   tuple(shlex.split(args.api_args)), max(1, args.repeat),
                   max(0, args.batch), args.sink_pipelining)  # fmt: skip


@contextlib.contextmanager
def running_sink(pipelining: bool = False) -> Iterator[Sink]:
    sink = Sink(pipelining).start()
    try:
        yield sink
    finally:
        sink.stop()


def ratios_of(results: list[Figures]) -> dict[str, float]:
    """The run's ratios, by name (those whose systems ran)."""
    by_name = {f.name.split()[0].rstrip(","): f for f in results}
    pr, naive, node = by_name.get("postroom"), by_name.get("naive"), by_name.get("nodemailer")
    out: dict[str, float] = {}
    if pr is None:
        return out
    if naive is not None:
        out["postroom e2e / naive e2e"] = pr.e2e / naive.e2e
        per = max(1, pr.batch)  # messages per request: the ratios are of messages/s
        if pr.intake and naive.intake:
            out["postroom intake / naive intake"] = pr.intake.rate * per / naive.intake.rate
        if pr.intake_alone and naive.intake:
            out["postroom intake, workers paused / naive intake"] = (
                pr.intake_alone.rate * per / naive.intake.rate)
    if node is not None:
        out["postroom e2e / nodemailer"] = pr.e2e / node.e2e
    return out


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    say(
        f"bench_pipeline: {options.messages} messages per system, {options.concurrency} "
        f"requests in flight, {options.workers} worker(s) x "
        f"{options.worker_concurrency or os.cpu_count()}"
        + (f", {options.repeat} rounds" if options.repeat > 1 else "")
        + (", the sink offers PIPELINING" if options.sink_pipelining else "")
    )
    say(f"before: {load_avg()}")
    log_dir = Path(tempfile.mkdtemp(prefix="postroom-bench-"))
    results: list[Figures] = []
    rounds: list[dict[str, float]] = []
    runners: list[Callable[[Sink, Path, Options], Figures | None]] = [run_postroom]
    if options.baselines:
        runners += [run_naive, run_nodemailer]
    with running_sink(options.sink_pipelining) as sink:
        for n in range(options.repeat):
            if options.repeat > 1:
                say(f"\n#### round {n + 1} of {options.repeat}")
            # each round starts with a different system, so that a slow spell of the
            # machine does not always fall on the same one
            shift = n % len(runners)
            figures: list[Figures] = []
            for runner in runners[shift:] + runners[:shift]:
                fig = runner(sink, log_dir, options)
                if fig is not None:
                    figures.append(fig)
                    print_figures(fig)
            results += figures
            rounds.append(ratios_of(figures))
            say("\n== ratios" + (f" (round {n + 1})" if options.repeat > 1 else ""))
            for name, value in rounds[-1].items():
                say(f"  {name:<48} {value:.2f}")
    say(f"\nafter: {load_avg()}")
    if options.repeat > 1 and rounds:
        say(f"\n== ratios over {len(rounds)} rounds: median (lowest - highest)")
        for name in rounds[0]:
            values = sorted(r[name] for r in rounds if name in r)
            say(f"  {name:<48} {statistics.median(values):.2f} "
                f"({values[0]:.2f} - {values[-1]:.2f})")
    failed = [line for f in results for line in f.checks if "FAILED" in line]
    if not failed:
        shutil.rmtree(log_dir, ignore_errors=True)
    else:
        say(f"\nchecks FAILED (logs kept in {log_dir}):")
        for line in failed:
            say(f"  {line}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
