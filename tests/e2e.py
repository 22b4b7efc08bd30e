"""The end-to-end harness: a real SMTP server, real worker processes, the API in process."""

from __future__ import annotations

import contextlib
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

from postroom.api.app import create_app
from postroom.shared.settings import Settings
from tests.helpers import ADMIN, auth, make_settings
from tests.smtp_server import ScriptedSmtpServer
from tests.stack import WorkerProcess, wait_for


class Stack:
    def __init__(self, settings: Settings, smtp: ScriptedSmtpServer, log_dir: Path) -> None:
        self.settings = settings
        self.smtp = smtp
        self.log_dir = log_dir
        self.client: FlaskClient = create_app(settings).test_client()
        self.workers: list[WorkerProcess] = []
        self.tokens: dict[str, str] = {}

    def solution(self, sid: str = "acme", **config: Any) -> str:
        r = self.client.post("/api/v1/solutions", json={"solution_id": sid, **config},
                             headers=auth(ADMIN))
        assert r.status_code == 201, r.get_json()
        self.tokens[sid] = r.get_json()["token"]
        return self.tokens[sid]

    def start_worker(self, concurrency: int = 2, **overrides: Any) -> WorkerProcess:
        settings = self.settings.replace(**overrides) if overrides else self.settings
        name = f"w{len(self.workers) + 1}"
        worker = WorkerProcess(settings, concurrency=concurrency, name=name,
                               log_path=self.log_dir / f"{name}.log").start()
        self.workers.append(worker)
        return worker

    def stop(self) -> None:
        """Warm shutdown of every worker, all at once (then each is waited for)."""
        running = [w for w in self.workers if w.proc is not None and w.proc.poll() is None]
        for worker in running:
            assert worker.proc is not None
            worker.proc.send_signal(signal.SIGTERM)
        for worker in running:
            assert worker.proc is not None
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker.proc.wait(20)
        for worker in self.workers:
            worker.stop()

    def send(self, body: dict[str, Any], sid: str = "acme", query: str = "",
             headers: dict[str, str] | None = None) -> Any:
        return self.client.post(f"/api/v1/solutions/{sid}/email{query}", json=body,
                                headers={**auth(self.tokens[sid]), **(headers or {})})

    def task(self, task_id: str, sid: str = "acme") -> dict[str, Any]:
        r = self.client.get(f"/api/v1/solutions/{sid}/tasks/{task_id}",
                            headers=auth(self.tokens[sid]))
        assert r.status_code == 200, r.get_json()
        doc: dict[str, Any] = r.get_json()
        return doc

    def wait_final(self, task_id: str, sid: str = "acme", timeout: float = 30) -> dict[str, Any]:
        def final() -> dict[str, Any] | None:
            doc = self.task(task_id, sid)
            return doc if doc["state"] in ("sent", "failed") else None

        doc: dict[str, Any] = wait_for(final, timeout, interval=0.05,
                                       message=f"task {task_id} to end")
        return doc

    def logs(self) -> bytes:
        return b"".join(p.read_bytes() for p in sorted(self.log_dir.glob("*.log")))

    def send_many(self, count: int, sid: str = "acme", prefix: str = "u") -> list[str]:
        """Send ``count`` one-recipient messages; returns their task ids (all 202)."""
        ids = []
        for i in range(count):
            r = self.send({"to": [f"{prefix}{i}@example.com"], "text": f"message {i}"}, sid)
            assert r.status_code == 202, r.get_json()
            ids.append(r.get_json()["task_id"])
        return ids

    def wait_all_final(self, task_ids: list[str], sid: str = "acme",
                       timeout: float = 60) -> list[dict[str, Any]]:
        """Every task's final document, waiting at most ``timeout`` seconds in all."""
        import time

        deadline = time.monotonic() + timeout
        return [self.wait_final(t, sid, timeout=max(0.1, deadline - time.monotonic()))
                for t in task_ids]


@pytest.fixture
def loopback_stack(
    redis_url: str, smtp_server: ScriptedSmtpServer, tmp_path: Path
) -> Iterator[Callable[..., Stack]]:
    """Make stacks whose default relay is ``smtp_server`` (allowed as 127.0.0.1), on the
    tests' Redis unless ``redis_url`` is among the overrides; each is stopped after the
    test. Overrides win over these defaults."""
    stacks: list[Stack] = []

    def make(**overrides: Any) -> Stack:
        url = overrides.pop("redis_url", redis_url)
        options: dict[str, Any] = {
            "default_smtp_url": f"smtp+plain://127.0.0.1:{smtp_server.port}",
            "smtp_allow_hosts": ("127.0.0.1",),
            **overrides,
        }
        stack = Stack(make_settings(url, **options), smtp_server, tmp_path)
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        stack.stop()
