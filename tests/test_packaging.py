"""One import name: installing postroom adds the package ``postroom`` and nothing else at
the top level, and the installed commands import nothing from the working directory."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import requests

from tests.e2e import Stack
from tests.helpers import auth
from tests.stack import ROOT, ApiProcess, WorkerProcess, wait_for

pytestmark = pytest.mark.slow


def installed_top_level(target: Path) -> set[str]:
    """The top-level names of the files the installed distribution's RECORD lists."""
    [dist_info] = target.glob("postroom-*.dist-info")
    names = set()
    for line in (dist_info / "RECORD").read_text().splitlines():
        path = line.rsplit(",", 2)[0]
        top = path.split("/")[0]
        if top != dist_info.name and top != "..":  # ../../bin/postroom: the command
            names.add(top)
    return names


def test_installing_adds_exactly_one_top_level_name(tmp_path: Path) -> None:
    """``pip install .`` (from a copy of the sources, as a user's clone is) installs the
    package ``postroom`` (with its Lua scripts) and no other top-level name."""
    sources = tmp_path / "postroom-src"
    shutil.copytree(ROOT, sources, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "__pycache__", ".*_cache", "node_modules"))
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(sources)],
        check=True, capture_output=True, timeout=300,
    )
    assert {"postroom"} == installed_top_level(target)
    assert {"postroom"} == {p.name for p in target.iterdir()
                            if not p.name.endswith(".dist-info") and p.name != "bin"}
    assert (target / "postroom" / "shared" / "lua" / "bucket.lua").is_file()
    assert (target / "postroom" / "py.typed").is_file()


def _decoys(folder: Path) -> Path:
    """A working directory holding packages named as postroom's own, each of which stops
    any process that imports it."""
    for name in ("postroom", "api", "worker", "shared"):
        (folder / name).mkdir(parents=True)
        (folder / name / "__init__.py").write_text(
            "raise SystemExit('imported from the working directory')\n")
    return folder


def test_the_commands_import_nothing_from_the_working_directory(
    loopback_stack: Callable[..., Stack], tmp_path: Path
) -> None:
    """``postroom api`` (gunicorn) and ``postroom worker`` started in a directory that holds
    folders named ``postroom``, ``api``, ``worker`` and ``shared`` run the installed code: a
    message sent through that API is delivered by that worker."""
    stack = loopback_stack()
    token = stack.solution("acme")
    cwd = _decoys(tmp_path / "elsewhere")
    worker = WorkerProcess(stack.settings, concurrency=1, cwd=cwd,
                           log_path=tmp_path / "worker.log").start()
    api = ApiProcess(stack.settings, workers=1, cwd=cwd, log_path=tmp_path / "api.log")
    try:
        api.start()
        r = requests.post(f"{api.url}/solutions/acme/email", headers=auth(token),
                          json={"to": ["ann@example.com"], "text": "hello"}, timeout=10)
        assert 202 == r.status_code, r.text
        wait_for(lambda: len(stack.smtp.messages) == 1, 30, interval=0.1,
                 message="the worker to deliver")
        assert worker.proc is not None and worker.proc.poll() is None
    finally:
        api.stop()
        worker.stop()
