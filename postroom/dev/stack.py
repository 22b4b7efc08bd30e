"""``postroom dev``: Redis, a capture SMTP sink, the API and a worker on one machine.

The API and the worker run as child processes (``postroom api`` and ``postroom worker``),
each in a session of its own so that a Ctrl-C in the terminal reaches this process only,
which then stops them in order: API and worker (SIGTERM, then SIGKILL to their whole
process group after a timeout), then the embedded Redis, then the sink.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from types import FrameType
from urllib.parse import urlsplit

from postroom.shared.crypto import SecretBox, generate_key
from postroom.shared.errors import ConfigError, Conflict
from postroom.shared.redis_client import redis_client
from postroom.shared.settings import Settings
from postroom.shared.solutions import SolutionStore

HOST = "127.0.0.1"
DEMO_SID = "demo"
DEMO_TOKEN = "demo-token"
STOP_TIMEOUT_S = 10.0
READY_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class DevOptions:
    port: int = 8080
    smtp_port: int = 1025
    mail_dir: str = os.path.join(".postroom", "mail")
    api_workers: int = 2
    concurrency: int = 2


class StackFailed(Exception):
    """A part of the stack died or never became ready."""


def say(message: str) -> None:
    print(message, flush=True)


def redact(url: str) -> str:
    """A URL without its credentials, fit for the console."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    netloc = f"{parts.hostname}:{parts.port}" if parts.port else str(parts.hostname)
    return parts._replace(netloc=netloc).geturl()


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((HOST, port)) == 0


# -- the children ----------------------------------------------------------------------


class Child:
    """A child process in its own session; stopped by SIGTERM, then its group killed."""

    def __init__(self, name: str, argv: list[str], env: Mapping[str, str]) -> None:
        self.name = name
        self.proc = subprocess.Popen(argv, env=dict(env), start_new_session=True)

    def exited(self) -> int | None:
        return self.proc.poll()

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()

    def wait_or_kill(self, deadline: float) -> None:
        try:
            self.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            say(f"postroom dev: {self.name} did not stop in time; killing it")
        # Whatever is left in its group (gunicorn workers, pool processes) goes too.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()


def stop_children(children: list[Child]) -> None:
    for child in reversed(children):
        child.terminate()
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for child in reversed(children):
        child.wait_or_kill(deadline)


@contextmanager
def running(children: list[Child]) -> Iterator[list[Child]]:
    try:
        yield children
    finally:
        stop_children(children)


# -- the parts -------------------------------------------------------------------------


def start_redis(stack: ExitStack, env: dict[str, str]) -> subprocess.Popen[bytes] | None:
    """Use POSTROOM_REDIS_URL if given, else start an embedded redis-server."""
    if env.get("POSTROOM_REDIS_URL"):
        say(f"redis      {redact(env['POSTROOM_REDIS_URL'])} (POSTROOM_REDIS_URL)")
        return None
    from postroom.dev.embedded_redis import EmbeddedRedis

    server = EmbeddedRedis()
    stack.callback(server.cleanup)
    server.start()
    env["POSTROOM_REDIS_URL"] = server.url
    say(f"redis      {server.url} (embedded, data in {server.data_dir})")
    return server.proc


def start_sink(stack: ExitStack, env: dict[str, str], options: DevOptions) -> None:
    """Start the capture sink unless POSTROOM_DEFAULT_SMTP_URL names a relay."""
    if env.get("POSTROOM_DEFAULT_SMTP_URL"):
        say(f"smtp       {redact(env['POSTROOM_DEFAULT_SMTP_URL'])} (POSTROOM_DEFAULT_SMTP_URL)")
        return
    from postroom.dev.sink import CapturedMessage, MailSink

    def announce(message: CapturedMessage) -> None:
        say(f"mail       {message.summary()}")

    if port_in_use(options.smtp_port):
        raise ConfigError(f"port {options.smtp_port} is in use (choose another: --smtp-port)")
    sink = MailSink(options.mail_dir, HOST, options.smtp_port, on_message=announce)
    sink.start()
    stack.callback(sink.stop)
    env["POSTROOM_DEFAULT_SMTP_URL"] = sink.url
    say(f"smtp       {sink.url} (capture sink, messages kept in {sink.mail_dir.resolve()})")


def ensure_demo(settings: Settings) -> None:
    """Solution ``demo`` exists and answers to ``demo-token``."""
    client = redis_client(settings.redis_url, socket_timeout=None)
    try:
        store = SolutionStore(client, SecretBox(settings.secret_key), settings.hlimit_default)
        try:
            store.create(DEMO_SID, {}, DEMO_TOKEN)
        except Conflict:
            if store.by_token(DEMO_TOKEN) != DEMO_SID:
                # No way to set a chosen token on an existing solution: recreate it.
                say(f"postroom dev: recreating solution {DEMO_SID!r} with token {DEMO_TOKEN!r}")
                store.delete(DEMO_SID)
                store.create(DEMO_SID, {}, DEMO_TOKEN)
    finally:
        client.close()


def wait_ready(url: str, children: list[Child], stop: threading.Event) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        check_alive(children)
        try:
            with urllib.request.urlopen(url, timeout=1) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if stop.wait(0.2):
            return
    raise StackFailed(f"the API did not answer {url} within {READY_TIMEOUT_S:.0f} s")


def check_alive(children: list[Child]) -> None:
    for child in children:
        code = child.exited()
        if code is not None:
            raise StackFailed(f"the {child.name} exited unexpectedly (exit code {code})")


def child_env(options: DevOptions) -> tuple[dict[str, str], list[str]]:
    """The environment of the children, and the lines that describe the generated parts."""
    env = dict(os.environ)
    notes: list[str] = []
    if not env.get("POSTROOM_ADMIN_TOKEN"):
        env["POSTROOM_ADMIN_TOKEN"] = "dev_" + secrets.token_urlsafe(24)
        notes.append(f"admin      token {env['POSTROOM_ADMIN_TOKEN']} (made for this session)")
    if not env.get("POSTROOM_SECRET_KEY"):
        env["POSTROOM_SECRET_KEY"] = generate_key()
    env.setdefault("POSTROOM_DEFAULT_SENDER_DOMAIN", "postroom.localhost")
    env.setdefault("POSTROOM_SMTP_ALLOW_HOSTS", "127.0.0.1,localhost")
    env.setdefault("POSTROOM_LOG_FORMAT", "text")
    return env, notes


def banner(options: DevOptions) -> list[str]:
    base = f"http://{HOST}:{options.port}/api/v1"
    auth = f"-H 'Authorization: Bearer {DEMO_TOKEN}'"
    body = '{"to":["someone@example.com"],"subject":"Hello","text":"Hello from postroom"}'
    return [
        "",
        f"postroom dev is ready: API {base}, solution {DEMO_SID!r} with token {DEMO_TOKEN!r}.",
        "Send a message as demo:",
        "",
        f"  curl -s -X POST {base}/solutions/{DEMO_SID}/email {auth} "
        f"-H 'Content-Type: application/json' -d '{body}'",
        "",
        "Then follow its task (task_id from the answer):",
        "",
        f"  curl -s {base}/solutions/{DEMO_SID}/tasks/TASK_ID {auth}",
        "",
        "Ctrl-C stops everything.",
        "",
    ]


# -- the whole -------------------------------------------------------------------------


def run(options: DevOptions) -> int:
    stop = threading.Event()
    caught: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        caught.append(signum)
        stop.set()

    previous = {
        sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    }
    try:
        return _run(options, stop)
    except StackFailed as exc:
        print(f"postroom dev: {exc}; stopped everything", file=sys.stderr, flush=True)
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run(options: DevOptions, stop: threading.Event) -> int:
    if port_in_use(options.port):
        raise ConfigError(f"port {options.port} is in use (choose another: --port)")
    env, notes = child_env(options)
    Settings.from_env(env, require_secrets=True)  # fail early, with the variable's name
    with ExitStack() as stack:
        redis_proc = start_redis(stack, env)
        start_sink(stack, env, options)
        settings = Settings.from_env(env, require_secrets=True)
        ensure_demo(settings)
        for line in notes:
            say(line)
        if stop.is_set():
            return 0

        cli = [sys.executable, "-m", "postroom.cli"]
        api_argv = [*cli, "api", "--bind", f"{HOST}:{options.port}",
                    "--workers", str(options.api_workers)]  # fmt: skip
        worker_argv = [*cli, "worker", "--concurrency", str(options.concurrency)]
        children: list[Child] = []
        with running(children):
            children.append(Child("API", api_argv, env))
            children.append(Child("worker", worker_argv, env))
            wait_ready(f"http://{HOST}:{options.port}/api/v1/solution/health", children, stop)
            if not stop.is_set():
                for line in banner(options):
                    say(line)
            while not stop.wait(0.25):
                try:
                    check_alive(children)
                    if redis_proc is not None and redis_proc.poll() is not None:
                        raise StackFailed("the embedded Redis exited unexpectedly")
                except StackFailed:
                    # A Ctrl-C also reaches the embedded Redis; give our handler a moment.
                    if stop.wait(0.5):
                        break
                    raise
            say("postroom dev: stopping")
    say("postroom dev: stopped")
    return 0
