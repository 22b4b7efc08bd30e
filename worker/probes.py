"""Files that say a worker is alive and consuming, for Kubernetes' probes (two bootsteps).

- ``POSTROOM_WORKER_HEARTBEAT_FILE``: touched every ``POSTROOM_WORKER_HEARTBEAT_INTERVAL_S``
  by a thread of the worker's main process, from start to shutdown. A liveness probe
  checks its age (``python -m postroom.worker.probes alive``). It keeps beating while the broker
  is away: a broker that blips must not get workers restarted (``celery inspect ping``
  would, and costs seconds of CPU besides).
- ``POSTROOM_WORKER_READY_FILE``: written when the worker starts consuming its queue,
  removed when it stops (a lost broker connection, a shutdown). A readiness probe checks
  that it exists (``python -m postroom.worker.probes ready``).

Both are off when their setting is empty. The heartbeat also feeds
``postroom_worker_heartbeat_timestamp_seconds`` (:func:`postroom.worker.metrics.beat`) when the
worker serves metrics.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from postroom.shared.settings import Settings

if TYPE_CHECKING:
    from celery import Celery

#: a heartbeat older than this many intervals means the worker is not alive
STALE_AFTER_BEATS = 6


def touch(path: str) -> None:
    Path(path).touch()


def install(app: Celery, settings: Settings) -> None:
    """Add the heartbeat step (worker) and the readiness step (consumer) to ``app``."""
    # imported here: the probes below run as their own short process, every few seconds,
    # and need neither Celery nor the metrics
    from celery import bootsteps

    from postroom.worker import metrics

    heartbeat_file = settings.worker_heartbeat_file
    ready_file = settings.worker_ready_file
    interval = max(0.1, settings.worker_heartbeat_interval_s)

    class HeartbeatStep(bootsteps.StartStopStep):
        """Touches the heartbeat file from a thread of the main process (started once the
        pool has forked its processes)."""

        requires = ("celery.worker.components:Pool",)

        def __init__(self, parent: Any, **kwargs: Any) -> None:
            super().__init__(parent, **kwargs)
            self.stopping = threading.Event()
            self.thread: threading.Thread | None = None

        def start(self, parent: Any) -> None:
            def run() -> None:
                while True:
                    if heartbeat_file:
                        touch(heartbeat_file)
                    metrics.beat()
                    if self.stopping.wait(interval):
                        return

            self.thread = threading.Thread(target=run, name="postroom-heartbeat", daemon=True)
            self.thread.start()

        def stop(self, parent: Any) -> None:
            self.stopping.set()

    class ReadyStep(bootsteps.StartStopStep):
        """Holds the readiness file while the consumer consumes."""

        requires = ("celery.worker.consumer.tasks:Tasks",)

        def start(self, parent: Any) -> None:
            if ready_file:
                touch(ready_file)

        def stop(self, parent: Any) -> None:
            if ready_file:
                Path(ready_file).unlink(missing_ok=True)

        shutdown = stop

    # nothing is added that nothing asks for: a worker without probe files or metrics
    # runs as it would without this module
    if heartbeat_file or settings.worker_metrics_port:
        app.steps["worker"].add(HeartbeatStep)
    if ready_file:
        app.steps["consumer"].add(ReadyStep)


# -- the probes (exec probes in deploy/k8s) --------------------------------------------


def alive(path: str, interval_s: float, now: float | None = None) -> bool:
    """Whether the heartbeat file was touched within :data:`STALE_AFTER_BEATS` intervals."""
    try:
        age = (time.time() if now is None else now) - os.stat(path).st_mtime
    except OSError:
        return False
    return age <= STALE_AFTER_BEATS * interval_s


def main(argv: list[str] | None = None) -> int:
    """``python -m postroom.worker.probes alive|ready``: exit 0 when the worker is, else 1. Reads
    the same ``POSTROOM_*`` variables as the worker."""
    parser = argparse.ArgumentParser(prog="python -m postroom.worker.probes")
    parser.add_argument("probe", choices=("alive", "ready"))
    args = parser.parse_args(argv)
    settings = Settings.from_env(os.environ, require_secrets=False)
    if args.probe == "alive":
        path = settings.worker_heartbeat_file
        ok = bool(path) and alive(path, settings.worker_heartbeat_interval_s)
    else:
        path = settings.worker_ready_file
        ok = bool(path) and os.path.exists(path)
    if not ok:
        print(f"worker not {args.probe}: {path or 'no file configured'}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
