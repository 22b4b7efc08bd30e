"""Where one message's time goes, from the API's intake to the worker's last Redis write.

Run on purpose:  .venv/bin/python bench/profile_worker.py [--messages N] [--cprofile]

It starts an embedded ``redis-server`` and the counting SMTP sink of ``bench_pipeline.py``
(a process of its own), then measures in this process, one message at a time:

1. the intake: ``POST /solutions/{sid}/email`` through Flask's test client (no HTTP server),
   and each of its steps alone (schema load, solution read, bucket peek, job, first
   document, publish to the broker);
2. the worker's ``Attempt(ctx, job).run()`` with the connection it opens per message, and
   again with the worker's ``SmtpPool`` (kept connections; this script swaps the context's
   pool, the service itself is not changed), and each step alone
   (document read, the attempt's first Redis step, the bucket script, MIME, SMTP, the last
   Redis step);
3. Celery's share: real ``postroom worker`` processes drain a burst of jobs, as shipped
   (prefork), without batches, at log level INFO (the default), as solo-pool
   processes, and as one solo process under cProfile, whose own time is summed per library
   (postroom, celery, kombu, redis-py, smtplib, socket I/O); their CPU per message is set
   beside the in-process Attempt's.

For every part it prints CPU and wall time per message, Redis round trips (socket writes)
and commands (Redis ``INFO commandstats``). ``--cprofile`` adds the top functions of the
Attempt path. Figures depend on the machine's load, printed before and after.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

import redis  # noqa: E402
import redis.connection  # noqa: E402
from bench_pipeline import (  # noqa: E402
    Sink,
    cpu_seconds,
    load_avg,
    message_body,
    process_tree,
    spawn,
    stop,
)

from postroom.dev.embedded_redis import EmbeddedRedis  # noqa: E402
from postroom.shared.crypto import generate_key  # noqa: E402
from postroom.shared.settings import Settings  # noqa: E402

SID = "profile"
ADMIN = "profile-admin-token"
DOMAIN = "profile.postroom.localhost"

# -- counting Redis round trips ------------------------------------------------------------

ROUND_TRIPS = Counter[str]()
_send_packed = redis.connection.AbstractConnection.send_packed_command


def _counting_send(self: Any, command: Any, check_health: bool = True) -> None:
    ROUND_TRIPS["writes"] += 1
    _send_packed(self, command, check_health)


redis.connection.AbstractConnection.send_packed_command = _counting_send  # type: ignore


def commandstats(client: redis.Redis) -> Counter[str]:
    stats = client.info("commandstats")
    return Counter({k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()})


class Meter:
    """CPU, wall time, round trips and Redis commands of a block, per message."""

    def __init__(self, admin: redis.Redis) -> None:
        self.admin = admin
        self.rows: list[tuple[str, float, float, float, float, str]] = []

    @contextmanager
    def measure(self, label: str, count: int, detail: bool = False) -> Iterator[None]:
        before_cmds = commandstats(self.admin)
        trips = ROUND_TRIPS["writes"]
        cpu, wall = time.process_time(), time.perf_counter()
        yield
        cpu = time.process_time() - cpu
        wall = time.perf_counter() - wall
        trips = ROUND_TRIPS["writes"] - trips
        after = commandstats(self.admin)
        delta = after - before_cmds
        delta["info"] -= 1
        delta = +delta
        commands = sum(delta.values())
        top = ""
        if detail:
            top = ", ".join(f"{k} {v / count:.1f}" for k, v in delta.most_common(12))
        self.rows.append(
            (label, cpu * 1e3 / count, wall * 1e3 / count, trips / count, commands / count, top)
        )

    def print(self, title: str) -> None:
        print(f"\n== {title}")
        print(f"  {'what':<46} {'CPU ms':>7} {'wall ms':>8} {'trips':>6} {'cmds':>6}")
        for label, cpu, wall, trips, cmds, top in self.rows:
            print(f"  {label:<46} {cpu:7.3f} {wall:8.3f} {trips:6.1f} {cmds:6.1f}")
            if top:
                print(f"  {'':<6}commands per message: {top}")
        self.rows.clear()


def repeat(fn: Callable[[int], object], count: int) -> None:
    for i in range(count):
        fn(i)


# -- the parts -----------------------------------------------------------------------------


def settings_for(redis_url: str, sink_port: int, key: str) -> Settings:
    return Settings(
        redis_url=redis_url,
        admin_token=ADMIN,
        secret_key=key,
        default_smtp_url=f"smtp+plain://127.0.0.1:{sink_port}",
        default_sender_domain=DOMAIN,
        smtp_allow_hosts=("127.0.0.1",),
        log_level="WARNING",
    )


def app_with_solution(settings: Settings) -> tuple[Any, Any, str]:
    """The API app (in process), its services, and the token of solution ``SID``."""
    from postroom.api.app import create_app

    app = create_app(settings)
    answer = app.test_client().post(
        "/api/v1/solutions",
        json={"solution_id": SID, "hLimit": 1_000_000_000},
        headers={"Authorization": f"Bearer {ADMIN}"},
    )
    return app, app.extensions["postroom"], answer.get_json()["token"]


def profile_intake(settings: Settings, meter: Meter, n: int) -> tuple[str, Any]:
    from postroom.api.intake.job import build_job
    from postroom.shared.documents import new_document
    from postroom.shared.queue import Enqueuer, make_producer
    from postroom.shared.schemas import load_or_raise

    app, svc, token = app_with_solution(settings)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    client = app.test_client()
    path = f"/api/v1/solutions/{SID}/email"

    def post(i: int) -> None:
        r = client.post(path, data=message_body(i), headers=headers)
        assert r.status_code == 202, r.get_json()

    repeat(post, 50)  # warm up
    with meter.measure("POST /email, whole request (test client)", n, detail=True):
        repeat(post, n)

    body = json.loads(message_body(1))
    solution = svc.solutions.get(SID)
    with meter.measure("  schema load (marshmallow)", n):
        repeat(lambda i: load_or_raise(svc.schemas.send, body), n)
    with meter.measure("  solution read (GET + JSON)", n):
        repeat(lambda i: svc.solutions.get(SID), n)
    with meter.measure("  token lookup (by_token)", n):
        repeat(lambda i: svc.solutions.by_token(token), n)
    with meter.measure("  bucket peek (Lua)", n):
        repeat(lambda i: svc.bucket.peek(SID, solution.hlimit(settings.hlimit_default), None), n)
    data = load_or_raise(svc.schemas.send, body)
    with meter.measure("  build_job (uuid, Message-ID)", n):
        repeat(lambda i: build_job(data, solution, settings, svc.box), n)
    jobs = [build_job(data, solution, settings, svc.box) for _ in range(n)]
    with meter.measure("  first document (SET)", n):
        repeat(lambda i: svc.documents.put(new_document(jobs[i]["task_id"], SID, 0.0)), n)
    null = Enqueuer(make_producer(settings), "profile-null")
    with meter.measure("  publish to the broker (send_task)", n):
        repeat(lambda i: null.enqueue(jobs[i]), n)
    # nobody consumes what this section enqueued: drop it (it would pad the drains below)
    svc.state.delete("profile-null", settings.queue)
    meter.print(f"intake, in process, per request ({n} requests)")
    return token, svc


def queued_jobs(svc: Any, settings: Settings, n: int) -> list[dict[str, Any]]:
    """Jobs as the API makes them, each with its first document written."""
    from postroom.api.intake.job import build_job
    from postroom.shared.documents import new_document
    from postroom.shared.schemas import load_or_raise

    solution = svc.solutions.get(SID)
    jobs = []
    for i in range(n):
        data = load_or_raise(svc.schemas.send, json.loads(message_body(i)))
        job = build_job(data, solution, settings, svc.box)
        svc.documents.put(new_document(job["task_id"], SID, job["created_at"]))
        jobs.append(job)
    return jobs


def profile_attempt(
    settings: Settings, svc: Any, sink: Sink, meter: Meter, n: int, cprofile: bool
) -> None:
    from postroom.shared import keys
    from postroom.shared.logs import configure_logging
    from postroom.worker import attempt_store as steps
    from postroom.worker.ledger import Outcomes
    from postroom.worker.message import build_message
    from postroom.worker.pool import SmtpPool
    from postroom.worker.resources import WorkerContext
    from postroom.worker.sending import Attempt
    from postroom.worker.smtp import SmtpConnection, deliver

    configure_logging(settings)
    ctx = WorkerContext.build(settings)
    pool = SmtpPool()

    class PerMessage:
        """A stand-in for the worker's pool that opens a connection per message."""

        def deliver(self, relay: Any, **kwargs: Any) -> Any:
            return deliver(relay, **kwargs)

    def run(jobs: list[dict[str, Any]]) -> Callable[[int], None]:
        return lambda i: Attempt(ctx, jobs[i]).run()

    profiles: dict[str, cProfile.Profile] = {}
    for label, stand_in in (("new connection per message", PerMessage()),
                            ("SmtpPool (kept connection)", pool)):  # fmt: skip
        ctx.pool = stand_in  # type: ignore[assignment]  # the worker's pool, swapped
        try:
            repeat(run(queued_jobs(svc, settings, 30)), 30)  # warm up
            jobs = queued_jobs(svc, settings, n)
            sink.reset()
            profile = cProfile.Profile() if cprofile else None
            with meter.measure(f"Attempt.run, {label}", n, detail=True):
                if profile:
                    profile.enable()
                repeat(run(jobs), n)
                if profile:
                    profile.disable()
            if profile:
                profiles[label] = profile
            count = sink.wait_count(n, 30)[0]
            docs = [svc.documents.get(SID, j["task_id"]) for j in jobs]
            sent = sum(1 for d in docs if d and d["state"] == "sent")
            assert (count, sent) == (n, n), (count, sent)
        finally:
            del ctx.pool  # back to the context's own (built on first use)

    # each step alone
    jobs = queued_jobs(svc, settings, n)
    solution = ctx.solutions.get(SID)
    relay = ctx.default_relay
    assert relay is not None
    msg = jobs[0]["message"]
    with meter.measure("  document read (GET + JSON)", n):
        repeat(lambda i: ctx.documents.get(SID, jobs[i]["task_id"]), n)
    with meter.measure("  begin: lease, document, ledger, solution (Lua)", n):
        repeat(lambda i: steps.begin(ctx, SID, jobs[i]["task_id"], 60.0), n)
    with meter.measure("  bucket take, marking the attempt (Lua)", n):
        ledgers = [keys.ledger(SID, j["task_id"]) for j in jobs]
        hlimit = solution.hlimit(settings.hlimit_default)
        repeat(lambda i: ctx.bucket.take(SID, hlimit, None, once_key=ledgers[i],
                                         attempt=1, ledger_ttl_s=3600), n)  # fmt: skip
    with meter.measure("  MIME build (build_message)", n):
        repeat(lambda i: build_message(sender=msg["from"], to=msg["to"], cc=msg["cc"],
                                       subject=msg["subject"], text=msg["text"], html=None,
                                       message_id=jobs[i]["message_id"]), n)  # fmt: skip
    data = build_message(sender=msg["from"], to=msg["to"], cc=msg["cc"], subject="x",
                         text="y", html=None, message_id="<p@profile>")  # fmt: skip
    smtp_args: dict[str, Any] = dict(connect_host=None, sender=msg["from"], recipients=msg["to"],
                                     data=data, timeout=30.0, ssl_context=ctx.ssl_context,
                                     local_hostname=ctx.local_hostname)  # fmt: skip
    with meter.measure("  SMTP, new connection (deliver)", n):
        repeat(lambda i: deliver(relay, **smtp_args), n)
    with meter.measure("  SMTP, kept connection (SmtpPool.deliver)", n):
        repeat(lambda i: pool.deliver(relay, **smtp_args), n)
    conn = SmtpConnection()
    conn.open(relay, connect_host=None, timeout=30.0, ssl_context=ctx.ssl_context,
              local_hostname=ctx.local_hostname)  # fmt: skip
    with meter.measure("  SMTP, one NOOP on a kept connection", n):
        repeat(lambda i: conn.is_alive(), n)
    conn.close()
    doc = ctx.documents.get(SID, jobs[0]["task_id"])
    assert doc is not None
    accepted = {msg["to"][0]: {"status": "accepted", "code": 250, "reply": None}}

    def finish(i: int) -> None:
        steps.finish(ctx, jobs[i], doc={**doc, "task_id": jobs[i]["task_id"], "state": "sent"},
                     transition="sent", outcomes=Outcomes(accepted, "250 ok"), release=True,
                     forget=True)  # fmt: skip

    with meter.measure("  finish: ledger, document, lease, stats, accepted", n):
        repeat(finish, n)
    pool.close_all()
    meter.print(f"worker Attempt path, in process, per message ({n} messages)")
    print(f"  pool: {pool.stats()}")

    for label, profile in profiles.items():
        out = io.StringIO()
        stats = pstats.Stats(profile, stream=out).strip_dirs().sort_stats("cumulative")
        stats.print_stats(28)
        print(f"\n== cProfile, Attempt.run, {label} (cumulative, top 28)")
        print("\n".join(line for line in out.getvalue().splitlines()[4:] if line.strip()))


DRAIN_SETUPS = {
    "prefork": ("prefork -c{c}, 1 process (as `postroom worker`)", None),
    "prefork+info": ("prefork -c{c}, POSTROOM_LOG_LEVEL=INFO (the default; JSON lines)", None),
    "prefork+batch1": ("prefork -c{c}, POSTROOM_WORKER_BATCH=1 (no batches)", None),
    "solo": ("solo pool, {c} processes (`postroom worker --pool solo`)", "solo"),
    "solo+cprofile": ("solo pool, 1 process under cProfile (where a worker's time goes)", "solo"),
}



def profile_drain(
    settings: Settings, svc: Any, sink: Sink, admin: redis.Redis, n: int, concurrency: int,
    setup: str,
) -> None:  # fmt: skip
    """Real ``postroom worker`` processes drain ``n`` jobs: rate, CPU and Redis commands
    per message (the broker's included)."""
    import tempfile

    from postroom.shared.queue import Enqueuer, make_producer

    env = {k: v for k, v in os.environ.items() if not k.startswith("POSTROOM_")}
    env.update(
        POSTROOM_REDIS_URL=settings.redis_url,
        POSTROOM_ADMIN_TOKEN=ADMIN,
        POSTROOM_SECRET_KEY=settings.secret_key,
        POSTROOM_DEFAULT_SMTP_URL=settings.default_smtp_url,
        POSTROOM_DEFAULT_SENDER_DOMAIN=DOMAIN,
        POSTROOM_SMTP_ALLOW_HOSTS="127.0.0.1",
        POSTROOM_LOG_LEVEL="INFO" if setup == "prefork+info" else "WARNING",
        PYTHONPATH=str(BENCH.parent),
    )
    if setup == "prefork+batch1":
        env["POSTROOM_WORKER_BATCH"] = "1"
    title, pool = DRAIN_SETUPS[setup]
    log_dir = Path(tempfile.mkdtemp(prefix="postroom-profile-"))
    cli = [sys.executable, "-m", "postroom.cli", "worker"]
    profile_out = log_dir / "worker.pstats"
    if setup == "solo+cprofile":
        argvs = [[sys.executable, "-m", "cProfile", "-o", str(profile_out), "-m", "postroom.cli",
                  "worker", "--pool", "solo"]]  # fmt: skip
    elif pool is None:
        argvs = [[*cli, "--concurrency", str(concurrency)]]
    else:
        argvs = [[*cli, "--pool", pool, "--hostname", f"solo{i}@%h"] for i in range(concurrency)]
    workers = [spawn(f"worker{i}", argv, env, log_dir) for i, argv in enumerate(argvs)]
    enqueuer = Enqueuer(make_producer(settings), settings.queue)
    try:
        sink.reset()
        for job in queued_jobs(svc, settings, 40 * len(workers)):
            enqueuer.enqueue(job)
        if sink.wait_count(40 * len(workers), 60)[0] < 40 * len(workers):
            raise RuntimeError(f"the worker did not start; see {log_dir}")
        jobs = queued_jobs(svc, settings, n)
        time.sleep(1.0)
        sink.reset()
        pids = [p for w in workers for p in process_tree(w.proc.pid)]
        mains = {w.proc.pid for w in workers}
        before = sum(cpu_seconds(p) for p in pids)
        before_main = sum(cpu_seconds(p) for p in pids if p in mains)
        commands = commandstats(admin)
        started = time.perf_counter()
        for job in jobs:  # enqueued faster than drained: the workers are never idle
            enqueuer.enqueue(job)
        count = sink.wait_count(n, 60 + n / 20)[0]
        elapsed = time.perf_counter() - started
        cpu = sum(cpu_seconds(p) for p in pids) - before
        cpu_main = sum(cpu_seconds(p) for p in pids if p in mains) - before_main
        delta = +(commandstats(admin) - commands)
    finally:
        for worker in workers:
            stop(worker)
    per_message = cpu * 1000 / n
    print(f"\n== real workers draining {n} queued jobs: {title.format(c=concurrency)}")
    print(f"  {count} sent in {elapsed:.2f} s = {count / elapsed:.0f} msg/s; "
          f"worker CPU {per_message:.2f} ms per message (all its processes; "
          f"main process {cpu_main * 1000 / n:.2f})")  # fmt: skip
    total = sum(delta.values()) / n
    top = ", ".join(f"{k} {v / n:.1f}" for k, v in delta.most_common(14))
    print(f"  Redis commands per message, broker and publishing included: {total:.1f}")
    print(f"      {top}")
    if setup == "solo+cprofile":
        print_groups(pstats.Stats(str(profile_out)), count)
    shutil.rmtree(log_dir, ignore_errors=True)


# (group, a part of the path or name) in order: the first that matches names the group
GROUPS = [
    ("postroom: worker/", "/worker/"),
    ("postroom: shared/", "/shared/"),
    ("celery", "/celery/"),
    ("kombu (broker transport)", "/kombu/"),
    ("billiard/vine/click", "/billiard/"),
    ("billiard/vine/click", "/vine/"),
    ("billiard/vine/click", "/click/"),
    ("redis-py", "/redis/"),
    ("smtplib", "smtplib.py"),
    ("json", "/json/"),
    ("logging", "/logging/"),
    ("cryptography/fernet", "/cryptography/"),
    ("waiting in epoll (idle time included)", "epoll"),
    ("socket I/O (recv, send, connect)", "socket"),
    ("socket I/O (recv, send, connect)", "BufferedReader"),
]


def print_groups(stats: pstats.Stats, count: int) -> None:
    """Own time (tottime) per library, per message: whose code the worker runs."""
    totals: Counter[str] = Counter()
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    for (filename, _, name), (_, _, tottime, _, _) in raw.items():
        where = f"{filename}:{name}"
        group = next((g for g, part in GROUPS if part in where), None)
        if group is None:
            group = "other Python (stdlib, builtins)" if filename != "~" else f"builtin {name}"
        totals[group] += tottime
    print(f"  own time per message by library (cProfile, {count} messages; idle waits included):")
    total = sum(totals.values())
    shown = 0.0
    for group, seconds in totals.most_common(14):
        shown += seconds
        print(f"    {group:<44} {seconds * 1000 / count:6.3f} ms  {seconds / total:5.1%}")
    print(f"    {'the rest':<44} {(total - shown) * 1000 / count:6.3f} ms")
    stats.sort_stats("tottime")
    out = io.StringIO()
    stats.stream = out  # type: ignore[attr-defined]
    stats.print_stats(15)
    print("  top functions by own time:")
    print("\n".join(line for line in out.getvalue().splitlines()[6:] if line.strip()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=2, help="drain worker's pool size")
    parser.add_argument("--cprofile", action="store_true", help="top functions of Attempt.run")
    parser.add_argument("--drain", action="append", choices=sorted(DRAIN_SETUPS),
                        help="only these drain measurements (repeatable); skips the in-process "
                             "parts")  # fmt: skip
    args = parser.parse_args()
    n = args.messages
    print(f"profile_worker: {n} messages per measurement; before: {load_avg()}")
    server = EmbeddedRedis().start()
    sink = Sink().start()
    try:
        settings = settings_for(server.url, sink.port, generate_key())
        admin = redis.Redis.from_url(server.url)
        meter = Meter(admin)
        if args.drain:
            svc = app_with_solution(settings)[1]
        else:
            _, svc = profile_intake(settings, meter, n)
            profile_attempt(settings, svc, sink, meter, n, args.cprofile)
        for setup in args.drain or DRAIN_SETUPS:
            profile_drain(settings, svc, sink, admin, n, args.concurrency, setup)
    finally:
        sink.stop()
        server.cleanup()
    print(f"\nafter: {load_avg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
