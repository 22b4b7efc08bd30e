"""``python -m postroom``: the ``postroom`` command."""

from postroom.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
