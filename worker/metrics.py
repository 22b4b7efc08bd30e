"""The worker's Prometheus metrics, and the endpoint that serves them.

``postroom worker`` serves ``/metrics`` on ``POSTROOM_WORKER_METRICS_PORT`` (default 9808;
0: none) from its main process, adding up what every pool process counted
(:mod:`postroom.shared.metrics_files`). The send path calls three functions of this module, and
nothing else of it: :func:`deliver` (around one SMTP transaction), :func:`written` (a
message's transition written down) and :func:`connections` (after idle connections were
closed). Each does nothing when the endpoint is off.

Labels stay bounded: an outcome, an error type, a reply class; the solution id only when
``POSTROOM_METRICS_SOLUTION_LABEL`` is on (one series per solution).
"""

from __future__ import annotations

import atexit
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from celery import Celery, bootsteps
from prometheus_client import Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric

from postroom.shared import metrics_files
from postroom.shared.connections import redis_clients
from postroom.shared.errors import SendError
from postroom.shared.queue_metrics import BacklogCollector
from postroom.shared.records import Job, TaskDocument
from postroom.shared.settings import Settings
from postroom.worker.pool import SmtpPool
from postroom.worker.smtp import DeliveryResult

log = logging.getLogger("postroom.worker")

#: how a transition written by the send path is named in ``postroom_worker_messages_total``
OUTCOMES = {"sent": "sent", "failed": "failed", "retrying": "retried", "deferred": "deferred"}
#: accepted -> sent: from sub-second to the whole retry budget
DELIVERY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 14400, 86400)
SMTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


@dataclass(frozen=True)
class WorkerMetrics:
    messages: Counter
    replies: Counter
    delivery: Histogram
    transaction: Histogram
    in_flight: Gauge
    relay_connections: Gauge
    per_solution: bool
    dead_letters: Counter | None = None

    @classmethod
    def build(cls, per_solution: bool) -> WorkerMetrics:
        """The metric objects, registered nowhere: a scrape reads them back from the files."""
        sol = ["solution"] if per_solution else []
        return cls(
            messages=Counter(
                "postroom_worker_messages", "Messages whose attempt ended, by outcome and "
                "error type", ["outcome", "type", *sol], registry=None,
            ),
            replies=Counter(
                "postroom_worker_smtp_replies", "SMTP transactions by the class of their "
                "last reply (none: no reply, e.g. a connection that failed)", ["class"],
                registry=None,
            ),
            delivery=Histogram(
                "postroom_worker_delivery_seconds", "From a message's acceptance (202) to "
                "its sending", sol, buckets=DELIVERY_BUCKETS, registry=None,
            ),
            transaction=Histogram(
                "postroom_worker_smtp_transaction_seconds", "One SMTP transaction (with the "
                "connection's opening when it had none)", buckets=SMTP_BUCKETS, registry=None,
            ),
            in_flight=Gauge(
                "postroom_worker_sends_in_flight", "SMTP transactions under way",
                multiprocess_mode="livesum", registry=None,
            ),
            relay_connections=Gauge(
                "postroom_worker_relay_connections", "SMTP connections kept open to relays",
                multiprocess_mode="livesum", registry=None,
            ),
            per_solution=per_solution,
            dead_letters=Counter(
                "postroom_worker_dead_letters", "Broker messages the worker could not "
                "read, set aside in Redis (postroom.shared.celery_wire.dead_letters), by reason",
                ["reason"],
                registry=None,
            ),
        )  # fmt: skip


_current: WorkerMetrics | None = None
# when the main process last beat (postroom.worker.probes): a plain value, read at scrape time by
# HeartbeatCollector. The beat comes from a thread, and a thread holding
# prometheus_client's lock (taken by every metric write) while the pool forks a process
# would leave that process's copy locked for good.
_last_beat: float | None = None


class HeartbeatCollector:
    """``postroom_worker_heartbeat_timestamp_seconds``, once the worker has beaten."""

    def collect(self) -> Iterator[Metric]:
        if _last_beat is not None:
            yield GaugeMetricFamily(
                "postroom_worker_heartbeat_timestamp_seconds",
                "When the worker's main process last beat (Unix time)", value=_last_beat,
            )


def current() -> WorkerMetrics | None:
    return _current


def install(app: Celery, settings: Settings) -> WorkerMetrics | None:
    """With a metrics port: keep metrics in files shared by the pool's processes (before
    the pool forks), make them, and serve them from the main process once the pool runs."""
    global _current
    if not settings.worker_metrics_port:
        _current = None
        return None
    path = metrics_files.prepare(settings, f"worker-{settings.worker_metrics_port}")
    atexit.register(metrics_files.remove_if_temporary, path)  # the main process's exit
    _current = WorkerMetrics.build(settings.metrics_solution_label)

    class MetricsServerStep(bootsteps.StartStopStep):
        """Serves ``/metrics`` on the metrics port (main process, after the pool forked)."""

        requires = ("celery.worker.components:Pool",)

        def start(self, parent: Any) -> None:
            serve(settings, path)

    app.steps["worker"].add(MetricsServerStep)
    return _current


def serve(settings: Settings, path: str) -> None:
    """Start the endpoint in a thread; a port in use is logged, not fatal (sending goes on)."""
    registry = metrics_files.collector_registry(path)
    state: list[Any] = []

    def client() -> Any:
        if not state:
            state.append(redis_clients(settings, socket_timeout=2.0)[0])
        return state[0]

    registry.register(BacklogCollector(settings, client))
    registry.register(HeartbeatCollector())
    try:
        start_http_server(settings.worker_metrics_port, registry=registry)
    except OSError as exc:
        log.error("metrics endpoint not started on port %s: %s",
                  settings.worker_metrics_port, exc)
        return
    log.info("metrics on port %s", settings.worker_metrics_port)


# -- what the send path calls ---------------------------------------------------------


def deliver(pool: SmtpPool, *args: Any, **kwargs: Any) -> DeliveryResult:
    """``pool.deliver(...)``, counted: in flight meanwhile, its duration, the class of its
    last reply, and the connections the pool keeps open after it."""
    m = _current
    if m is None:
        return pool.deliver(*args, **kwargs)
    m.in_flight.inc()
    start = time.perf_counter()
    code: int | None = None
    try:
        result = pool.deliver(*args, **kwargs)
        code = _code(result.response)
        return result
    except SendError as err:
        code = err.extra.get("smtp_code")
        raise
    finally:
        m.transaction.observe(time.perf_counter() - start)
        m.replies.labels(reply_class(code)).inc()
        m.in_flight.dec()
        m.relay_connections.set(pool.idle_count())


def written(transition: str, doc: TaskDocument, job: Job) -> None:
    """A message's attempt ended in ``transition`` (``sent``, ``failed``, ``retrying``,
    ``deferred``), written down with the document ``doc``."""
    m = _current
    outcome = OUTCOMES.get(transition)
    if m is None or outcome is None:
        return
    error = doc.get("error") or {}
    sol = [job["solution_id"]] if m.per_solution else []
    m.messages.labels(outcome, str(error.get("type") or "none"), *sol).inc()
    if transition == "sent":
        waited = max(0.0, time.time() - float(job["created_at"]))
        if sol:
            m.delivery.labels(*sol).observe(waited)
        else:
            m.delivery.observe(waited)


def connections(pool: SmtpPool) -> None:
    """The pool's connections changed outside a send (idle ones closed)."""
    m = _current
    if m is not None:
        m.relay_connections.set(pool.idle_count())


def dead_letter(reason: str) -> None:
    """A message the worker could not read was set aside
    (:mod:`postroom.shared.celery_wire.dead_letters`)."""
    m = _current
    if m is not None and m.dead_letters is not None:
        m.dead_letters.labels(reason).inc()


def beat() -> None:
    """The main process is alive (see :mod:`postroom.worker.probes`)."""
    global _last_beat
    _last_beat = time.time()


def reply_class(code: Any) -> str:
    """``2xx``, ``4xx``, ``5xx`` (or another ``Nxx``), or ``none`` without a reply code."""
    if isinstance(code, int) and 100 <= code <= 599:
        return f"{code // 100}xx"
    return "none"


def _code(response: str) -> int | None:
    head = response[:3]
    return int(head) if head.isdigit() else None
