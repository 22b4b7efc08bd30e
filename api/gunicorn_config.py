"""gunicorn settings that ``postroom api`` loads (``--config python:postroom.api.gunicorn_config``).

A worker process that ends (a restart, a crash, ``--max-requests``) is marked dead in the
metrics directory (:mod:`postroom.shared.metrics_files`): its counters keep counting in the sums,
its live gauges no longer do.
"""

from __future__ import annotations

import os
from typing import Any

from postroom.shared import metrics_files


def child_exit(server: Any, worker: Any) -> None:
    path = os.environ.get(metrics_files.ENV)
    if path:
        metrics_files.mark_dead(worker.pid, path)


def on_exit(server: Any) -> None:
    path = os.environ.get(metrics_files.ENV)
    if path:
        metrics_files.remove_if_temporary(path)
