"""Real processes for end-to-end tests: Celery workers started as the service starts them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from postroom.shared.settings import Settings
from tests.helpers import env_of

ROOT = Path(__file__).resolve().parent.parent


def console_script() -> str:
    """The ``postroom`` command installed beside this Python."""
    return str(Path(sys.executable).parent / "postroom")


class WorkerProcess:
    """``python -m postroom.worker.main`` with the environment that reproduces ``settings``."""

    def __init__(self, settings: Settings, concurrency: int = 2, name: str = "w1",
                 log_path: Path | None = None, cwd: Path | None = None) -> None:
        self.settings = settings
        self.cwd = cwd
        self.concurrency = concurrency
        self.name = name
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    def start(self) -> WorkerProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("POSTROOM_")}
        env.update(env_of(self.settings))
        command = [sys.executable, "-m", "postroom.worker.main"]
        if self.cwd is None:
            env["PYTHONPATH"] = str(ROOT)
        else:  # the installed command, as an operator runs it, from another directory
            command = [console_script(), "worker"]
        self._log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            [*command, "--concurrency", str(self.concurrency),
             "--hostname", f"{self.name}@%h", "--without-heartbeat", "--without-gossip",
             "--without-mingle"],
            env=env, cwd=self.cwd or ROOT, stdout=self._log, stderr=self._log,
            start_new_session=True,
        )
        return self

    def children(self) -> list[int]:
        assert self.proc is not None
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True,
                             text=True, check=False).stdout
        return [int(p) for p in out.split()]

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        code = self.proc.returncode
        if self._log not in (None, subprocess.DEVNULL):
            self._log.close()
        return code

    def kill(self) -> None:
        """``kill -9`` of the worker and its pool children."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.05,
             message: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


def _terminate(proc: subprocess.Popen[bytes], timeout: float) -> int:
    """SIGTERM, then SIGKILL of the whole group if it has not ended within ``timeout``."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    return proc.returncode


class ApiProcess:
    """``postroom api`` (gunicorn, sync workers) with the environment of ``settings``."""

    def __init__(self, settings: Settings, workers: int = 4, log_path: Path | None = None,
                 extra: Sequence[str] = (), cwd: Path | None = None) -> None:
        from postroom.dev.embedded_redis import free_port

        self.settings = settings
        self.cwd = cwd
        self.workers = workers
        self.extra = list(extra)
        self.port = free_port()
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/v1"

    def start(self, timeout: float = 30.0) -> ApiProcess:
        import urllib.request

        env = {k: v for k, v in os.environ.items() if not k.startswith("POSTROOM_")}
        env.update(env_of(self.settings))
        command = [sys.executable, "-m", "postroom.cli"]
        if self.cwd is None:
            env["PYTHONPATH"] = str(ROOT)
        else:  # the installed command, as an operator runs it, from another directory
            command = [console_script()]
        self._log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            [*command, "api", "--bind", f"127.0.0.1:{self.port}",
             "--workers", str(self.workers), *self.extra],
            env=env, cwd=self.cwd or ROOT, stdout=self._log, stderr=self._log,
            start_new_session=True,
        )

        def healthy() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"postroom api exited with {self.proc.returncode}")
            try:
                with urllib.request.urlopen(f"{self.url}/solution/health", timeout=1) as r:
                    return bool(r.status == 200)
            except OSError:
                return False

        wait_for(healthy, timeout, interval=0.1, message="the API to answer")
        return self

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.proc is None:
            return None
        code = _terminate(self.proc, timeout)
        if self._log not in (None, subprocess.DEVNULL):
            self._log.close()
        return code


def terminate_worker(worker: WorkerProcess) -> None:
    """SIGTERM to a worker's main process (Celery's warm shutdown), without waiting."""
    assert worker.proc is not None
    worker.proc.send_signal(signal.SIGTERM)


def kill_pool_child(worker: WorkerProcess) -> int:
    """``kill -9`` of one pool child of ``worker``; returns its pid."""
    [pid, *_] = worker.children()
    os.kill(pid, signal.SIGKILL)
    return pid
