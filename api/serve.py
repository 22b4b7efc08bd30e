"""The gunicorn that ``postroom api`` runs: gunicorn's own, minus one habit.

gunicorn's command puts its working directory first on ``sys.path`` before it imports the
application by name (``Application.chdir``), so a folder named ``postroom`` in the directory
the API is started from would stand in for the installed package. This module is the one
place that changes gunicorn's behaviour: it keeps the change of directory and drops the
``sys.path`` entry. ``postroom api`` runs it as ``python -P -m postroom.api.serve`` (``-P``:
nor does Python put the working directory on ``sys.path``). Every gunicorn option works as
in gunicorn's own command. Written for gunicorn 25.1 to 27 (the range in ``pyproject.toml``;
``tests/test_dependencies.py`` checks the method it overrides).
"""

from __future__ import annotations

import os

from gunicorn.app.wsgiapp import WSGIApplication


class Server(WSGIApplication):
    """gunicorn's WSGI application that imports nothing from the working directory."""

    def chdir(self) -> None:
        os.chdir(self.cfg.chdir)


def main() -> None:
    Server("%(prog)s [OPTIONS] [APP_MODULE]", prog="postroom api").run()


if __name__ == "__main__":
    main()
