"""What counting costs: the worker's metric calls per message, and the API's per request,
with values kept in memory-mapped files (multiprocess mode, as `postroom api` and
`postroom worker` run) against plain in-memory values, in the same run.

    .venv/bin/python bench/bench_metrics.py [--messages 20000] [--requests 5000]

Each side runs in a fresh child process (prometheus_client chooses its value class once
per process). Prints microseconds per message / request and the ratios.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def worker_side(messages: int, files: bool) -> dict[str, float]:
    """The three calls the send path makes per message, around a pool that sends nothing."""
    from celery import Celery

    from postroom.shared.settings import Settings
    from postroom.worker import metrics
    from postroom.worker.smtp import DeliveryResult

    settings = Settings(worker_metrics_port=9 if files else 0,
                        metrics_dir=tempfile.mkdtemp() if files else "")
    if files:
        metrics.install(Celery(set_as_current=False), settings)
    else:  # the same metric objects, with in-memory values
        metrics._current = metrics.WorkerMetrics.build(per_solution=False)
    result = DeliveryResult(accepted=["a@example.com"], rejected=[], deferred=[],
                            response="250 2.0.0 OK")

    class Pool:
        def deliver(self, *args: object, **kwargs: object) -> DeliveryResult:
            return result

        def idle_count(self) -> int:
            return 1

    pool = Pool()
    job = {"solution_id": "acme", "created_at": time.time()}
    doc: dict[str, object] = {"error": None}
    start = time.perf_counter()
    for _ in range(messages):
        metrics.deliver(pool)  # type: ignore[arg-type]
        metrics.written("sent", doc, job)
        metrics.connections(pool)  # type: ignore[arg-type]
    per_message = (time.perf_counter() - start) / messages * 1e6
    return {"us_per_message": per_message}


def api_side(requests: int, files: bool) -> dict[str, float]:
    """GET /api/v1/solution/health through the Flask app (its counters and histogram)."""
    import fakeredis

    from postroom.api.app import create_app
    from postroom.api.services import Services
    from postroom.shared import metrics_files
    from postroom.shared.crypto import generate_key
    from postroom.shared.settings import Settings

    settings = Settings(metrics_dir=tempfile.mkdtemp() if files else "",
                        secret_key=generate_key())
    if files:
        metrics_files.prepare(settings, "api")
    services = dataclasses.replace(Services.build(settings), state=fakeredis.FakeRedis())
    app = create_app(settings, services).test_client()
    for _ in range(200):
        app.get("/api/v1/solution/health")
    start = time.perf_counter()
    for _ in range(requests):
        app.get("/api/v1/solution/health")
    per_request = (time.perf_counter() - start) / requests * 1e6
    start = time.perf_counter()
    for _ in range(20):
        app.get("/metrics")
    return {"us_per_request": per_request,
            "ms_per_scrape": (time.perf_counter() - start) / 20 * 1e3}


def child(side: str, n: int, files: bool) -> dict[str, float]:
    code = (f"import json, bench.bench_metrics as b; "
            f"print(json.dumps(b.{side}({n}, {files})))")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POSTROOM_", "PROMETHEUS"))}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    figures: dict[str, float] = json.loads(out.strip().splitlines()[-1])
    return figures


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    rows: dict[str, list[dict[str, float]]] = {}
    for _ in range(args.repeat):  # alternate, so drift hits both sides alike
        for files in (False, True):
            rows.setdefault(f"worker files={files}", []).append(
                child("worker_side", args.messages, files))
            rows.setdefault(f"api files={files}", []).append(
                child("api_side", args.requests, files))

    def median(key: str, field: str) -> float:
        values = sorted(r[field] for r in rows[key])
        return values[len(values) // 2]

    w0, w1 = median("worker files=False", "us_per_message"), median("worker files=True",
                                                                     "us_per_message")
    a0, a1 = median("api files=False", "us_per_request"), median("api files=True",
                                                                 "us_per_request")
    print(f"worker metric calls per message: in memory {w0:.1f} us, in files {w1:.1f} us "
          f"(x{w1 / w0:.2f})")
    print(f"API request (health, counted):   in memory {a0:.1f} us, in files {a1:.1f} us "
          f"(x{a1 / a0:.2f})")
    print(f"API scrape: in memory {median('api files=False', 'ms_per_scrape'):.2f} ms, "
          f"in files {median('api files=True', 'ms_per_scrape'):.2f} ms")


if __name__ == "__main__":
    main()
