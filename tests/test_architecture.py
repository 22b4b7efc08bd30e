"""docs/architecture.md stays true: every file it names exists, and its table of Redis keys
names every key function of shared/keys.py."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

from postroom.shared import keys

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "architecture.md"
#: a repository path in backticks: `api/routes/email.py`,
#: `shared/lua/bucket.lua`, ...
PATH = re.compile(
    r"`((?:api|worker|shared|postroom|tests|docs|deploy|bench)/[\w./-]+\.(?:py|lua|md))`")


def test_every_file_the_architecture_page_names_exists() -> None:
    """Each module, script or page named in docs/architecture.md is in the repository; a
    module renamed or removed fails here until the page is brought up to date."""
    named = sorted(set(PATH.findall(DOC.read_text())))
    assert len(named) > 40, named  # the page names the path of a send, module by module
    assert [] == [p for p in named if not (ROOT / p).is_file()]


def test_the_architecture_page_lists_every_redis_key() -> None:
    """Every key function of shared/keys.py has its row in the page's table of keys."""
    text = DOC.read_text()
    functions = [name for name, fn in inspect.getmembers(keys, inspect.isfunction)
                 if fn.__module__ == keys.__name__]
    assert [] == [name for name in functions if f"| `{name}` |" not in text]
