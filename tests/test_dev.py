"""``postroom dev`` end to end: embedded Redis, sink, API and worker as real processes."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from email.parser import BytesParser
from email.policy import default as default_policy
from pathlib import Path

import pytest
import requests

from postroom.dev.embedded_redis import free_port

REPO = Path(__file__).resolve().parents[1]
DEMO_AUTH = {"Authorization": "Bearer demo-token"}


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait_for_line(log: Path, pattern: str, proc: subprocess.Popen[bytes], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in log.read_text(errors="replace").splitlines():
            if re.search(pattern, line):
                return line
        if proc.poll() is not None:
            pytest.fail(f"postroom dev exited ({proc.returncode}):\n{log.read_text()}")
        time.sleep(0.2)
    pytest.fail(f"no line matching {pattern!r} within {timeout} s:\n{log.read_text()}")


@pytest.fixture
def dev_stack(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path, int, int]]:
    """`postroom dev` on free ports, without POSTROOM_REDIS_URL (so with embedded Redis)."""
    api_port, smtp_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSTROOM_")}
    env["PYTHONPATH"] = str(REPO)
    log = tmp_path / "dev.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "postroom.cli", "dev",
                "--port", str(api_port),
                "--smtp-port", str(smtp_port),
                "--mail-dir", str(tmp_path / "mail"),
            ],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        yield proc, log, api_port, smtp_port
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.mark.slow
def test_dev_sends_a_message_to_the_sink_and_stops_cleanly_on_ctrl_c(
    dev_stack: tuple[subprocess.Popen[bytes], Path, int, int], tmp_path: Path
) -> None:
    """The printed curl line works: demo's message reaches the sink; SIGINT stops all, exit 0."""
    proc, log, api_port, smtp_port = dev_stack
    curl = wait_for_line(log, r"curl -s -X POST ", proc, timeout=90)
    base = f"http://127.0.0.1:{api_port}/api/v1"
    assert f"{base}/solutions/demo/email" in curl
    assert "Bearer demo-token" in curl
    redis_line = wait_for_line(log, r"redis://127\.0\.0\.1:\d+", proc, timeout=1)
    found = re.search(r"redis://127\.0\.0\.1:(\d+)", redis_line)
    assert found is not None
    redis_port = int(found.group(1))

    answer = requests.post(
        f"{base}/solutions/demo/email",
        headers=DEMO_AUTH,
        json={"to": ["someone@example.com"], "subject": "Hello from test_dev", "text": "Hi"},
        timeout=10,
    )
    assert 202 == answer.status_code, answer.text
    task_id = answer.json()["task_id"]

    deadline = time.monotonic() + 60
    document: dict[str, object] = {}
    while time.monotonic() < deadline:
        doc = requests.get(f"{base}/solutions/demo/tasks/{task_id}", headers=DEMO_AUTH, timeout=5)
        assert 200 == doc.status_code, doc.text
        document = doc.json()
        if document["state"] in ("sent", "failed"):
            break
        time.sleep(0.2)
    assert "sent" == document.get("state"), document

    files = sorted((tmp_path / "mail").glob("*.eml"))
    assert 1 == len(files)
    parsed = BytesParser(policy=default_policy).parsebytes(files[0].read_bytes())
    assert "Hello from test_dev" == parsed["subject"]
    assert "someone@example.com" == parsed["to"]
    wait_for_line(log, r"mail .*Hello from test_dev", proc, timeout=5)

    proc.send_signal(signal.SIGINT)
    assert 0 == proc.wait(15), log.read_text()
    for port in (api_port, smtp_port, redis_port):
        assert not listening(port), f"port {port} still answers after postroom dev stopped"
