"""``postroom worker``: read the settings from the environment, run a Celery worker."""

from __future__ import annotations

import os
import sys

from postroom.shared.errors import ConfigError
from postroom.shared.logs import configure_logging
from postroom.shared.settings import Settings
from postroom.worker.app import make_celery


def main(argv: list[str]) -> None:
    settings = Settings.from_env(os.environ)
    configure_logging(settings)
    app = make_celery(settings)
    # gossip, mingle and heartbeats serve Celery's remote control and monitoring, which
    # postroom does not use: without them a worker starts a second sooner and sends less
    args = [
        "worker", "--queues", settings.queue, "--pool", "prefork",
        "--without-gossip", "--without-mingle", "--without-heartbeat", *argv,
    ]
    if not any(a.startswith(("--loglevel", "-l")) for a in argv):
        args += ["--loglevel", settings.log_level]
    app.worker_main(argv=args)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except ConfigError as exc:
        print(f"postroom worker: {exc}", file=sys.stderr)
        sys.exit(2)
