"""``postroom worker``: read the settings from the environment, run a Celery worker."""

from __future__ import annotations

import os
import sys

from shared.logs import configure_logging
from shared.settings import Settings
from worker.app import make_celery


def main(argv: list[str]) -> None:
    settings = Settings.from_env(os.environ)
    configure_logging(settings)
    app = make_celery(settings)
    args = ["worker", "--queues", settings.queue, "--pool", "prefork", *argv]
    if not any(a.startswith(("--loglevel", "-l")) for a in argv):
        args += ["--loglevel", settings.log_level]
    app.worker_main(argv=args)


if __name__ == "__main__":
    main(sys.argv[1:])
