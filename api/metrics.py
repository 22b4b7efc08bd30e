"""``GET /metrics``: Prometheus text.

Under ``postroom api`` the request counters of every gunicorn process are added up at each
scrape (:mod:`postroom.shared.metrics_files`), so whichever process answers reports the same
counts; elsewhere (tests, an app built in process) they are this process's. The queue and
outcome figures are read from Redis at scrape time.
"""

from __future__ import annotations

import time

from flask import Flask, Response, g, request
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from redis.exceptions import RedisError

from postroom.api.services import Services
from postroom.shared import keys, metrics_files
from postroom.shared.queue_metrics import BacklogCollector
from postroom.shared.redis_values import as_str


class _RedisCollector:
    """Outcomes counted in Redis by every worker (``postroom_messages_total``)."""

    def __init__(self, svc: Services) -> None:
        self._svc = svc

    def collect(self):  # type: ignore[no-untyped-def]
        outcomes = CounterMetricFamily(
            "postroom_messages", "Messages by final outcome", labels=["outcome"]
        )
        try:
            for name, value in self._svc.state.hgetall(keys.stats()).items():
                outcomes.add_metric([as_str(name)], float(value))
            yield outcomes
        except (RedisError, OSError):
            return


def register(app: Flask) -> None:
    shared_dir = metrics_files.active()
    registry = CollectorRegistry() if shared_dir is None else (
        metrics_files.collector_registry(shared_dir)
    )
    # with files, the counters are read back from them: registered nowhere else
    own = registry if shared_dir is None else None
    requests = Counter(
        "postroom_http_requests", "HTTP requests", ["method", "route", "status"],
        registry=own,
    )
    latency = Histogram(
        "postroom_http_request_seconds", "HTTP request latency", ["route"], registry=own,
        buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5, 30),
    )
    svc: Services = app.extensions["postroom"]
    registry.register(BacklogCollector(svc.settings, lambda: svc.state))
    registry.register(_RedisCollector(svc))

    @app.before_request
    def _start() -> None:
        g.postroom_t0 = time.perf_counter()

    @app.after_request
    def _count(response: Response) -> Response:
        route = request.url_rule.rule if request.url_rule else "unmatched"
        requests.labels(request.method, route, str(response.status_code)).inc()
        t0 = g.get("postroom_t0")
        if t0 is not None:
            latency.labels(route).observe(time.perf_counter() - t0)
        return response

    @app.get("/metrics")
    def _metrics() -> Response:
        return Response(generate_latest(registry), mimetype="text/plain; version=0.0.4")
