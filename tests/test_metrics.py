"""Metrics that add up: the API's counters summed over its gunicorn processes, the worker's
endpoint counting what its pool processes did, and the probe files a worker keeps."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from postroom.dev.embedded_redis import free_port
from postroom.shared import metrics_files
from postroom.shared.settings import Settings
from postroom.worker import metrics, probes
from tests.e2e import Stack
from tests.helpers import ADMIN, auth, env_of, make_settings
from tests.stack import ROOT, ApiProcess, wait_for

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(text: str) -> Samples:
    """Every sample of a Prometheus text page: (name, labels) -> value."""
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            found[(s.name, frozenset(s.labels.items()))] = float(s.value)
    return found


def total(page: Samples, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in page.items() if n == name and want <= ls)


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=5) as r:
        return samples(r.read().decode())


# -- the API under gunicorn ------------------------------------------------------------


@pytest.mark.slow
def test_api_counters_add_up_across_gunicorn_processes(
    redis_url: str, real_redis: Any, tmp_path: Path
) -> None:
    """With 4 gunicorn processes, 20 scrapes taken while sending each report every request
    made so far, whichever process answers: no counter ever goes down, and the request
    count equals the requests made."""
    settings = make_settings(redis_url, metrics_dir=str(tmp_path / "api-metrics"))
    api = ApiProcess(settings, workers=4, log_path=tmp_path / "api.log").start()
    try:
        base = f"http://127.0.0.1:{api.port}"
        # requests made below (ApiProcess.start's health checks are left out: one that
        # timed out while the processes started may still have been answered and counted)
        made = 0
        with requests.Session() as http:
            r = http.post(f"{api.url}/solutions", json={"solution_id": "acme"},
                          headers=auth(ADMIN), timeout=5)
            assert 201 == r.status_code
            made += 1
            token = r.json()["token"]
            pages: list[Samples] = []
            for i in range(20):
                for j in range(3):
                    r = http.post(f"{api.url}/solutions/acme/email",
                                  json={"to": [f"u{i}.{j}@example.com"], "text": "x"},
                                  headers=auth(token), timeout=5)
                    assert 202 == r.status_code, r.text
                    made += 1
                page = samples(http.get(f"{base}/metrics", timeout=5).text)
                counted = total(page, "postroom_http_requests_total")
                scrapes = total(page, "postroom_http_requests_total", route="/metrics")
                health = total(page, "postroom_http_requests_total",
                               route="/api/v1/solution/health")
                assert (made, i) == (counted - scrapes - health, scrapes)
                pages.append(page)
        for before, after in zip(pages, pages[1:], strict=False):
            for (name, labels), value in before.items():
                if name.endswith(("_total", "_count", "_sum", "_bucket")):
                    assert after.get((name, labels), 0.0) >= value, (name, labels)
        assert 60 == total(pages[-1], "postroom_http_requests_total", status="202")
        assert 60 == total(pages[-1], "postroom_http_request_seconds_count",
                           route="/api/v1/solutions/<sid>/email")
    finally:
        api.stop()
    assert all(not name.startswith("gauge_live")
               for name in os.listdir(tmp_path / "api-metrics" / "api"))


# -- the worker's endpoint and probe files ---------------------------------------------


@pytest.fixture
def probe_files(tmp_path: Path) -> dict[str, Any]:
    return {
        "worker_metrics_port": free_port(),
        "worker_heartbeat_file": str(tmp_path / "heartbeat"),
        "worker_ready_file": str(tmp_path / "ready"),
        "worker_heartbeat_interval_s": 0.5,
    }


@pytest.mark.slow
def test_worker_metrics_count_every_send(
    loopback_stack: Any, real_redis: Any, probe_files: dict[str, Any]
) -> None:
    """After sends through a worker of 2 pool processes, its endpoint counts each message
    once: sent messages, delivery latencies and SMTP transactions equal the messages sent,
    a refused one is failed by its type with a 5xx reply, and nothing is left in flight.
    Meanwhile the worker holds its readiness file and keeps its heartbeat fresh, and drops
    the readiness file when it stops."""
    stack: Stack = loopback_stack(**probe_files)
    stack.solution(hLimit=100)
    worker = stack.start_worker(concurrency=2)
    ready = Path(probe_files["worker_ready_file"])
    wait_for(ready.exists, 30, message="the readiness file")
    sent = stack.send_many(12)
    stack.smtp.script.rcpt_replies = {"bad@example.com": "550 5.1.1 no such user"}
    refused = stack.send({"to": ["bad@example.com"], "text": "x"}).get_json()["task_id"]
    docs = stack.wait_all_final([*sent, refused])
    assert ["sent"] * 12 + ["failed"] == [d["state"] for d in docs]

    url = f"http://127.0.0.1:{probe_files['worker_metrics_port']}/metrics"
    page = scrape(url)
    assert 12 == total(page, "postroom_worker_messages_total", outcome="sent", type="none")
    assert 1 == total(page, "postroom_worker_messages_total", outcome="failed",
                      type="SmtpRejected")
    assert 12 == total(page, "postroom_worker_delivery_seconds_count")
    assert 13 == total(page, "postroom_worker_smtp_transaction_seconds_count")
    assert (12, 1) == (total(page, "postroom_worker_smtp_replies_total", **{"class": "2xx"}),
                       total(page, "postroom_worker_smtp_replies_total", **{"class": "5xx"}))
    assert 0 == total(page, "postroom_worker_sends_in_flight")
    # each process keeps a connection per lane that sent, at most the instance's relay cap
    assert 0 < total(page, "postroom_worker_relay_connections") <= stack.settings.relay_concurrency
    assert 0 == total(page, "postroom_queue_depth")
    assert 0 < total(page, "postroom_worker_heartbeat_timestamp_seconds")
    assert not any(("solution", "acme") in labels for _, labels in page)

    env = {**os.environ, **env_of(stack.settings), "PYTHONPATH": str(ROOT)}
    for probe in ("alive", "ready"):
        proc = subprocess.run([sys.executable, "-m", "postroom.worker.probes", probe], env=env,
                              capture_output=True, text=True, timeout=30, check=False)
        assert 0 == proc.returncode, proc.stderr
    assert 0 == worker.stop()
    assert not ready.exists()


@pytest.mark.slow
def test_worker_metrics_with_a_solution_label(
    loopback_stack: Any, real_redis: Any, probe_files: dict[str, Any]
) -> None:
    """``POSTROOM_METRICS_SOLUTION_LABEL`` adds the solution to the message metrics."""
    stack: Stack = loopback_stack(metrics_solution_label=True, **probe_files)
    stack.solution(hLimit=100)
    stack.start_worker(concurrency=1)
    stack.wait_all_final(stack.send_many(2))
    page = scrape(f"http://127.0.0.1:{probe_files['worker_metrics_port']}/metrics")
    assert 2 == total(page, "postroom_worker_messages_total", outcome="sent", solution="acme")
    assert 2 == total(page, "postroom_worker_delivery_seconds_count", solution="acme")


# -- pieces ----------------------------------------------------------------------------


def test_reply_classes() -> None:
    """SMTP replies are counted by class; no code (a refused connection) is ``none``."""
    assert ["2xx", "4xx", "5xx", "none", "none"] == [
        metrics.reply_class(c) for c in (250, 451, 550, None, 999)
    ]


def test_sweep_marks_the_dead_and_keeps_their_counters(tmp_path: Path) -> None:
    """A process gone without a hook loses its live gauges at the next sweep; counters
    of any process stay (so sums never go down)."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead = int(proc.stdout)
    names = [f"gauge_livesum_{dead}.db", f"counter_{dead}.db", f"gauge_livesum_{os.getpid()}.db"]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    assert [dead] == metrics_files.sweep(str(tmp_path))
    assert sorted(names[1:]) == sorted(os.listdir(tmp_path))


def test_prepare_empties_the_directory(tmp_path: Path, monkeypatch: Any) -> None:
    """A command's metrics directory starts empty: files of an earlier run would add it."""
    from prometheus_client import values

    monkeypatch.setattr(values, "ValueClass", values.ValueClass)
    monkeypatch.setenv(metrics_files.ENV, "")
    (tmp_path / "counter_1.db").write_bytes(b"old")
    (tmp_path / "keep.txt").write_text("not ours")
    path = metrics_files.prepare(Settings(metrics_dir=str(tmp_path.parent)), tmp_path.name)
    assert (str(tmp_path), ["keep.txt"]) == (path, os.listdir(tmp_path))
    assert path == metrics_files.active()


def test_heartbeat_ages(tmp_path: Path) -> None:
    """The liveness probe passes while the heartbeat is younger than six intervals."""
    beat = tmp_path / "hb"
    probes.touch(str(beat))
    mtime = beat.stat().st_mtime
    assert probes.alive(str(beat), 10, now=mtime + 59)
    assert not probes.alive(str(beat), 10, now=mtime + 61)
    assert not probes.alive(str(tmp_path / "none"), 10)


@pytest.fixture(autouse=True)
def _no_worker_metrics_left() -> Iterator[None]:
    yield
    metrics._current = None


@pytest.mark.slow
@pytest.mark.fault
def test_a_broker_blip_unreadies_a_worker_but_never_stops_its_heartbeat(
    loopback_stack: Any, real_redis: Any, probe_files: dict[str, Any], tmp_path: Path
) -> None:
    """The broker (a Redis of its own) is killed: the worker drops its readiness file (it
    consumes nothing) while its heartbeat goes on, so a liveness probe restarts nothing;
    with the broker back, the worker is ready again and sends."""
    from postroom.dev.embedded_redis import EmbeddedRedis

    broker = EmbeddedRedis(appendonly=True).start()
    try:
        stack: Stack = loopback_stack(broker_url=broker.url, **probe_files)
        stack.solution(hLimit=100)
        stack.start_worker(concurrency=1)
        ready = Path(probe_files["worker_ready_file"])
        beat = Path(probe_files["worker_heartbeat_file"])
        wait_for(ready.exists, 30, message="the readiness file")
        broker.kill()
        wait_for(lambda: not ready.exists(), 30, message="the readiness file to go")
        before = beat.stat().st_mtime
        wait_for(lambda: beat.stat().st_mtime > before, 5, message="a heartbeat")
        assert probes.alive(str(beat), probe_files["worker_heartbeat_interval_s"])
        broker.start()
        wait_for(ready.exists, 60, message="the readiness file again")
        [task_id] = stack.send_many(1)
        assert "sent" == stack.wait_final(task_id)["state"]
    finally:
        broker.cleanup()
