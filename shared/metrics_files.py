"""Where a command's processes keep their Prometheus metrics, so that one scrape adds them up.

``postroom api`` runs several gunicorn processes and ``postroom worker`` a prefork pool:
each process counts what it did itself. prometheus_client's multiprocess mode keeps each
process's values in memory-mapped files of one directory, and a scrape reads them all
(:func:`collector_registry`): counters and histograms are summed over every process that
ever wrote (a process that ended keeps its share, so a counter never goes down), and the
live gauges over the processes still running (:func:`mark_dead` and :func:`sweep` remove
the share of those that ended).

The directory is a subdirectory of ``POSTROOM_METRICS_DIR`` named for the command
(``api``; ``worker-<metrics port>``, so that the workers of one host keep apart), else a
new temporary one. It is emptied when the command starts (:func:`prepare`): files left by
an earlier run would add that run's counts.
prometheus_client finds it through ``PROMETHEUS_MULTIPROC_DIR``, which :func:`prepare`
sets for this process and the processes it starts.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import tempfile
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, values
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from postroom.shared.settings import Settings

#: prometheus_client's name for the directory (its own variable; not a POSTROOM_ setting)
ENV = "PROMETHEUS_MULTIPROC_DIR"
#: the name of a temporary directory made by :func:`prepare` begins so
TEMP_PREFIX = "postroom-metrics-"
_LIVE_GAUGE = re.compile(r"^gauge_live\w*?_(\d+)\.db$")


def prepare(settings: Settings, role: str) -> str:
    """Make this process and its children keep metrics in files of one directory, emptied
    now; returns the directory. Call it before the processes that count are started."""
    if settings.metrics_dir:
        path = os.path.join(settings.metrics_dir, role)
    else:
        path = tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{role}-")
    os.makedirs(path, exist_ok=True)
    for name in glob.glob(os.path.join(path, "*.db")):
        os.remove(name)
    os.environ[ENV] = path
    # metrics made from now on write to the files, even if prometheus_client was imported
    # (and chose in-memory values) before the variable was set
    values.ValueClass = values.MultiProcessValue()
    return path


def remove_if_temporary(path: str) -> None:
    """Remove ``path`` when :func:`prepare` made it (the command is ending)."""
    if os.path.basename(path).startswith(TEMP_PREFIX):
        shutil.rmtree(path, ignore_errors=True)


def active() -> str | None:
    """The directory when this process keeps its metrics in files, else None."""
    if not getattr(values.ValueClass, "_multiprocess", False):
        return None
    return os.environ.get(ENV) or None


def collector_registry(path: str) -> CollectorRegistry:
    """A registry that reads every process's files in ``path`` at each scrape."""
    registry = CollectorRegistry()
    registry.register(_Sweeper(path))  # first: the dead are marked before the sums
    MultiProcessCollector(registry, path=path)
    return registry


class _Sweeper:
    """A collector that yields nothing and marks the dead (:func:`sweep`) at each scrape."""

    def __init__(self, path: str) -> None:
        self._path = path

    def collect(self) -> Iterator[Metric]:
        sweep(self._path)
        return iter(())


def mark_dead(pid: int, path: str) -> None:
    """Process ``pid`` has ended: its live gauges (sends in flight, ...) no longer count."""
    mark_process_dead(pid, path)


def sweep(path: str) -> list[int]:
    """Mark dead every process that left live gauges in ``path`` and no longer runs (one
    killed outright has no hook to do it); returns their pids."""
    dead = []
    for name in os.listdir(path):
        found = _LIVE_GAUGE.match(name)
        if found and not _running(int(found.group(1))):
            dead.append(int(found.group(1)))
    for pid in sorted(set(dead)):
        mark_dead(pid, path)
    return sorted(set(dead))


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process with that pid: running
        return True
    return True
