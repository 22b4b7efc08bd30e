"""The backlog as Prometheus gauges, read from Redis at each scrape (API and worker alike).

``postroom_queue_depth``: messages waiting in the broker's list (a Redis broker only: the
list is named for the queue, :func:`queue_key`); ``postroom_scheduled``: messages parked
for a retry, a token or their send time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import redis
from prometheus_client.core import GaugeMetricFamily, Metric
from redis.exceptions import RedisError

from postroom.shared import keys
from postroom.shared.settings import Settings


def queue_key(settings: Settings) -> str:
    """The Redis list that holds the queued messages of a Redis broker (kombu's key for the
    queue at priority 0: the queue's name). KEDA's trigger in deploy/k8s watches it."""
    return settings.queue


class BacklogCollector:
    """Yields the two gauges; nothing when Redis does not answer (the scrape still works)."""

    def __init__(self, settings: Settings, state: Callable[[], redis.Redis]) -> None:
        self._settings = settings
        self._state = state

    def collect(self) -> Iterator[Metric]:
        queue = GaugeMetricFamily("postroom_queue_depth", "Messages waiting in the broker")
        scheduled = GaugeMetricFamily(
            "postroom_scheduled", "Messages waiting for a retry, a token or their send time"
        )
        try:
            state = self._state()
            if self._settings.broker_url == self._settings.redis_url:
                queue.add_metric([], float(state.llen(queue_key(self._settings))))
                yield queue
            scheduled.add_metric([], float(state.zcard(keys.schedule())))
            yield scheduled
        except (RedisError, OSError):
            return
