"""The ``postroom`` command.

It starts gunicorn and the Celery worker by import string and imports neither
``postroom.api`` nor ``postroom.worker`` itself (``postroom.worker.main`` is imported only
when ``postroom worker`` runs). Nothing is imported from the working directory: gunicorn
runs as ``python -P -m postroom.api.serve`` (:mod:`postroom.api.serve`).
Every command reads only ``POSTROOM_*`` variables, through :class:`Settings`.

Exit codes: 0 success, 1 an operation failed (not found, conflict, Redis unreachable),
2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import sys
from collections.abc import Callable, Sequence

import redis

from postroom.shared import metrics_files
from postroom.shared.crypto import SecretBox, generate_key
from postroom.shared.errors import ConfigError, PostroomError
from postroom.shared.redis_client import redis_client
from postroom.shared.settings import Settings
from postroom.shared.solutions import SolutionStore

PROG = "postroom"
WSGI_APP = "postroom.api.wsgi:app_from_env()"
DEFAULT_BIND = "127.0.0.1:8080"
# gunicorn's sync worker that closes a finished connection at once (api/server.py), named
# by import string: this module imports nothing of postroom.api
API_WORKER_CLASS = "postroom.api.server.SyncWorker"
# A sync worker is held for the whole of a `?wait=N` request (N <= 30 s): stay above it.
DEFAULT_API_TIMEOUT_S = 60
GUNICORN_CONFIG = "python:postroom.api.gunicorn_config"
# gunicorn's command, minus its working directory on sys.path
SERVE_MODULE = "postroom.api.serve"


def cores() -> int:
    """CPUs this process may run on (the affinity mask, as in a container), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def default_api_workers() -> int:
    return 2 * cores()


def load_settings(require_secrets: bool = True) -> Settings:
    """``Settings`` from the environment; raises ConfigError with a clear message."""
    return Settings.from_env(os.environ, require_secrets=require_secrets)


# -- keygen --------------------------------------------------------------------------


def cmd_keygen(args: argparse.Namespace, extra: list[str]) -> int:
    print(generate_key())
    return 0


# -- api -----------------------------------------------------------------------------


def gunicorn_argv(args: argparse.Namespace, log_level: str, extra: Sequence[str]) -> list[str]:
    """The command line that runs the API under gunicorn."""
    argv = [
        sys.executable, "-P", "-m", SERVE_MODULE,
        "--bind", args.bind,
        "--workers", str(args.workers),
        "--worker-class", args.worker_class,
        "--timeout", str(args.timeout),
        "--log-level", log_level.lower(),
    ]  # fmt: skip
    # gunicorn's control socket has one default path per user: several API processes on
    # one host would take it from each other. Off unless a path is given.
    if not any(a.startswith("--control-socket") for a in extra):
        argv.append("--no-control-socket")
    # gunicorn hooks (a dead worker's metrics marked); an operator's own -c replaces them
    if not any(a in ("-c", "--config") or a.startswith("--config=") for a in extra):
        argv += ["--config", GUNICORN_CONFIG]
    return [*argv, *extra, WSGI_APP]


def cmd_api(args: argparse.Namespace, extra: list[str]) -> int:
    settings = load_settings()
    # every gunicorn process counts into one directory; GET /metrics adds them up
    metrics_files.prepare(settings, "api")
    argv = gunicorn_argv(args, settings.log_level, extra)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, argv)
    return 0  # not reached


# -- worker --------------------------------------------------------------------------


def cmd_worker(args: argparse.Namespace, extra: list[str]) -> int:
    load_settings()
    argv = list(extra)
    if args.concurrency is not None:
        argv = ["--concurrency", str(args.concurrency), *argv]
    importlib.import_module("postroom.worker.main").main(argv)
    return 0


# -- queue ---------------------------------------------------------------------------


def cmd_queue_move(args: argparse.Namespace, extra: list[str]) -> int:
    from postroom.shared.broker_move import move_jobs
    from postroom.shared.queue import make_enqueuer

    settings = load_settings(require_secrets=False)
    source: str = args.source
    if not source.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(f"--from must be the old Redis broker's redis:// URL, got {source!r}")
    if source == settings.broker_url:
        raise ConfigError("--from names the broker in use now (POSTROOM_BROKER_URL)")
    enqueuer = make_enqueuer(settings, redis_client(settings.redis_url))
    moved = move_jobs(redis_client(source), settings.queue, enqueuer.enqueue,
                      include_unacked=not args.keep_unacked)  # fmt: skip
    print(f"moved {moved.queued} queued and {moved.unacked} unacknowledged job(s) to the "
          f"broker in use now; {moved.skipped} other message(s) set aside in "
          f"{settings.queue}.unknown")  # fmt: skip
    return 0


# -- solution ------------------------------------------------------------------------


def _store() -> SolutionStore:
    settings = load_settings(require_secrets=False)
    if not settings.secret_key:
        raise ConfigError(
            "POSTROOM_SECRET_KEY must be set (the key the service runs with; "
            "generate one with `postroom keygen`)"
        )
    client = redis_client(settings.redis_url, socket_timeout=None)
    return SolutionStore(client, SecretBox(settings.secret_key), settings.hlimit_default)


def cmd_solution_create(args: argparse.Namespace, extra: list[str]) -> int:
    from postroom.shared.schemas.solutions import SOLUTION_ID  # the rule POST /solutions applies

    if not re.fullmatch(SOLUTION_ID, args.sid):
        raise ConfigError(
            f"invalid solution id {args.sid!r}: 1 to 63 lower-case letters, digits, '_' "
            "and '-', starting with a letter or a digit"
        )
    if args.token is not None and not re.fullmatch(r"[\x21-\x7e]{1,256}", args.token):
        raise ConfigError("--token must be 1 to 256 printable ASCII characters, no spaces")
    config: dict[str, object] = {}
    if args.hlimit is not None:
        config["hLimit"] = args.hlimit
    if args.policy is not None:
        config["hLimit_policy"] = args.policy
    print(_store().create(args.sid, config, args.token))
    return 0


def cmd_solution_show(args: argparse.Namespace, extra: list[str]) -> int:
    print(json.dumps(_store().get(args.sid).public(), indent=2, sort_keys=True))
    return 0


def cmd_solution_list(args: argparse.Namespace, extra: list[str]) -> int:
    for sid in _store().list_ids():
        print(sid)
    return 0


def cmd_solution_rotate(args: argparse.Namespace, extra: list[str]) -> int:
    print(_store().rotate_token(args.sid))
    return 0


def cmd_solution_delete(args: argparse.Namespace, extra: list[str]) -> int:
    _store().delete(args.sid)
    return 0


# -- dev -----------------------------------------------------------------------------


def cmd_dev(args: argparse.Namespace, extra: list[str]) -> int:
    from postroom.dev.stack import DevOptions, run

    return run(
        DevOptions(
            port=args.port,
            smtp_port=args.smtp_port,
            mail_dir=args.mail_dir,
            api_workers=args.api_workers,
            concurrency=args.concurrency,
        )
    )


# -- parser --------------------------------------------------------------------------


def _non_negative(raw: str) -> int:
    value = int(raw)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _port(raw: str) -> int:
    value = int(raw)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port (1-65535), got {value}")
    return value


Handler = Callable[[argparse.Namespace, list[str]], int]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="postroom: a queue-backed email service (Flask API, Celery workers, Redis).",
        epilog="Configuration comes from POSTROOM_* environment variables only.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("keygen", help="print a new POSTROOM_SECRET_KEY (a Fernet key)")
    p.set_defaults(handler=cmd_keygen, passthrough=False)

    p = sub.add_parser(
        "api",
        allow_abbrev=False,
        help="run the HTTP API under gunicorn",
        description="Run the HTTP API under gunicorn (sync workers). Requires "
        "POSTROOM_ADMIN_TOKEN and POSTROOM_SECRET_KEY. Options not listed here are "
        "passed to gunicorn as they are (e.g. --access-logfile -, --graceful-timeout S; "
        "gunicorn's control socket is off unless --control-socket PATH is given).",
    )
    p.add_argument(
        "--bind",
        default=DEFAULT_BIND,
        metavar="HOST:PORT",
        help=f"address to listen on (default {DEFAULT_BIND})",
    )
    p.add_argument(
        "--workers",
        type=_positive,
        default=default_api_workers(),
        metavar="N",
        help="gunicorn worker processes (default 2 x CPU cores = "
        f"{default_api_workers()} here; each sync worker serves one request at a "
        "time, and a ?wait=N request holds one for up to N seconds)",
    )
    p.add_argument(
        "--worker-class",
        default=API_WORKER_CLASS,
        metavar="CLASS",
        help=f"gunicorn worker class (default {API_WORKER_CLASS}: gunicorn's sync worker, "
        "closing a connection at once when its request was read whole)",
    )
    p.add_argument(
        "--timeout",
        type=_positive,
        default=DEFAULT_API_TIMEOUT_S,
        metavar="S",
        help="seconds before gunicorn restarts a silent worker "
        f"(default {DEFAULT_API_TIMEOUT_S}, above the longest ?wait=30)",
    )
    p.set_defaults(handler=cmd_api, passthrough=True)

    p = sub.add_parser(
        "worker",
        allow_abbrev=False,
        help="run a Celery worker that sends the queued messages",
        description="Run a Celery worker. Requires POSTROOM_ADMIN_TOKEN and "
        "POSTROOM_SECRET_KEY. Other options (e.g. --loglevel, --hostname, "
        "--max-tasks-per-child) are passed to `celery worker` as they are.",
    )
    p.add_argument(
        "--concurrency",
        type=_positive,
        default=None,
        metavar="N",
        help="prefork pool processes (default: Celery's, the number of CPUs)",
    )
    p.set_defaults(handler=cmd_worker, passthrough=True)

    p = sub.add_parser("solution", help="administer solutions (needs POSTROOM_SECRET_KEY)")
    ssub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    q = ssub.add_parser("create", help="create a solution and print its token (shown once)")
    q.add_argument("sid", metavar="SID")
    q.add_argument(
        "--hlimit",
        type=_non_negative,
        default=None,
        metavar="N",
        help="messages per hour (default 10; 0 stops sending)",
    )
    q.add_argument(
        "--policy",
        choices=("reject", "defer"),
        default=None,
        help="when the hourly limit is reached (default reject)",
    )
    q.add_argument("--token", default=None, help="use this token instead of a new random one")
    q.set_defaults(handler=cmd_solution_create, passthrough=False)
    q = ssub.add_parser("show", help="print a solution as JSON (never its password)")
    q.add_argument("sid", metavar="SID")
    q.set_defaults(handler=cmd_solution_show, passthrough=False)
    q = ssub.add_parser("list", help="print every solution id")
    q.set_defaults(handler=cmd_solution_list, passthrough=False)
    q = ssub.add_parser("rotate-token", help="replace a solution's token and print the new one")
    q.add_argument("sid", metavar="SID")
    q.set_defaults(handler=cmd_solution_rotate, passthrough=False)
    q = ssub.add_parser("delete", help="delete a solution, its token, bucket and suppressions")
    q.add_argument("sid", metavar="SID")
    q.set_defaults(handler=cmd_solution_delete, passthrough=False)

    p = sub.add_parser("queue", help="operate on the broker's queue")
    qsub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    q = qsub.add_parser(
        "move",
        help="move the jobs waiting on an old Redis broker to POSTROOM_BROKER_URL",
        description="Move the send jobs waiting on a Redis broker that is no longer "
        "POSTROOM_BROKER_URL (and those its stopped workers held unacknowledged) to the "
        "broker in use now. Run it after the old workers have stopped; running it again "
        "is safe (a job published twice is sent once).",
    )
    q.add_argument("--from", dest="source", required=True, metavar="URL",
                   help="the old broker (a redis:// URL)")  # fmt: skip
    q.add_argument("--keep-unacked", action="store_true",
                   help="leave the old workers' unacknowledged jobs where they are")  # fmt: skip
    q.set_defaults(handler=cmd_queue_move, passthrough=False)

    p = sub.add_parser(
        "dev",
        help="run everything on this machine (Redis, SMTP sink, API, worker)",
        description="Run Redis (POSTROOM_REDIS_URL if set, else an embedded one), a capture "
        "SMTP sink (unless POSTROOM_DEFAULT_SMTP_URL is set), the API and one worker, with "
        "solution `demo` (token `demo-token`). Ctrl-C stops everything.",
    )
    p.add_argument(
        "--port", type=_port, default=8080, metavar="PORT", help="API port (default 8080)"
    )
    p.add_argument(
        "--smtp-port",
        type=_port,
        default=1025,
        metavar="PORT",
        help="capture SMTP sink port (default 1025)",
    )
    p.add_argument(
        "--mail-dir",
        default=os.path.join(".postroom", "mail"),
        metavar="DIR",
        help="where the sink keeps each message as .eml (default ./.postroom/mail)",
    )
    p.add_argument(
        "--api-workers", type=_positive, default=2, metavar="N", help="gunicorn workers (default 2)"
    )
    p.add_argument(
        "--concurrency",
        type=_positive,
        default=2,
        metavar="N",
        help="Celery worker processes (default 2)",
    )
    p.set_defaults(handler=cmd_dev, passthrough=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not args.passthrough:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    handler: Handler = args.handler
    try:
        return handler(args, extra)
    except ConfigError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    except PostroomError as exc:
        print(f"{PROG}: {exc.message}", file=sys.stderr)
        return 1
    except redis.RedisError as exc:
        print(f"{PROG}: Redis: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
