"""``GET /metrics``: Prometheus text.

Request counters are this process's; the queue and outcome figures are read from Redis
at scrape time, so every API process reports the same, service-wide numbers.
"""

from __future__ import annotations

import time

from flask import Flask, Response, g, request
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from redis.exceptions import RedisError

from api.services import Services
from shared import keys
from shared.text import as_str


class _RedisCollector:
    def __init__(self, svc: Services) -> None:
        self._svc = svc

    def collect(self):  # type: ignore[no-untyped-def]
        queue = GaugeMetricFamily("postroom_queue_depth", "Messages waiting in the broker")
        scheduled = GaugeMetricFamily(
            "postroom_scheduled", "Messages waiting for a retry or a token"
        )
        outcomes = CounterMetricFamily(
            "postroom_messages", "Messages by final outcome", labels=["outcome"]
        )
        try:
            state = self._svc.state
            if self._svc.settings.broker_url == self._svc.settings.redis_url:
                queue.add_metric([], float(state.llen(self._svc.settings.queue)))
                yield queue
            scheduled.add_metric([], float(state.zcard(keys.schedule())))
            yield scheduled
            for name, value in state.hgetall(keys.stats()).items():
                outcomes.add_metric([as_str(name)], float(value))
            yield outcomes
        except (RedisError, OSError):
            return


def register(app: Flask) -> None:
    registry = CollectorRegistry()
    requests = Counter(
        "postroom_http_requests", "HTTP requests", ["method", "route", "status"],
        registry=registry,
    )
    latency = Histogram(
        "postroom_http_request_seconds", "HTTP request latency", ["route"], registry=registry,
        buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5, 30),
    )
    registry.register(_RedisCollector(app.extensions["postroom"]))

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
