"""The dependency ranges in pyproject.toml hold for what is installed, and the library
internals postroom reaches into are there in the installed versions."""

from __future__ import annotations

import inspect
from importlib import metadata

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

#: the libraries whose internals postroom reaches into, and where
FENCED = ("celery", "kombu", "redis", "gunicorn", "email-validator")


def requirements() -> dict[str, Requirement]:
    reqs = [Requirement(r) for r in metadata.requires("postroom") or []]
    return {r.name: r for r in reqs if r.marker is None}


@pytest.mark.parametrize("name", FENCED)
def test_a_fenced_library_has_an_upper_bound_on_its_major_and_is_installed_within_it(
    name: str,
) -> None:
    """Each library postroom reaches into is bounded below the next major, and the
    installed version lies in the declared range."""
    req = requirements()[name]
    uppers = [s for s in req.specifier if s.operator == "<"]
    assert uppers, f"{name} has no upper bound"
    installed = Version(metadata.version(name))
    assert req.specifier.contains(installed, prereleases=True), (name, str(installed))


def test_kombu_takes_the_unacked_restore_options_postroom_sets() -> None:
    """The Redis transport options of postroom/shared/queue.py exist in the installed kombu (5.7
    added them; an older kombu ignores them without a word)."""
    from kombu.transport.redis import Channel

    from postroom.shared.queue import celery_config
    from tests.helpers import make_settings

    options = celery_config(make_settings("redis://127.0.0.1:6379/0"))[
        "broker_transport_options"]
    restore = {k for k in options if k.startswith("unacked_restore")}
    assert restore and restore <= set(Channel.from_transport_options)


def test_gunicorn_has_the_no_control_socket_flag_the_cli_passes() -> None:
    """``postroom api`` passes ``--no-control-socket``: the installed gunicorn knows it."""
    from gunicorn.config import KNOWN_SETTINGS

    flags = {flag for setting in KNOWN_SETTINGS for flag in setting.cli or ()}
    assert "--no-control-socket" in flags


def test_celerys_consumer_has_the_handlers_the_dead_letter_consumer_replaces() -> None:
    """postroom.worker.dead_letters.Consumer overrides four handlers of Celery's consumer: each
    exists there with the same parameters."""
    from celery.worker.consumer import Consumer as CeleryConsumer

    from postroom.worker.dead_letters import Consumer

    for name in ("on_unknown_message", "on_unknown_task", "on_invalid_task",
                 "on_decode_error"):
        ours = inspect.signature(getattr(Consumer, name)).parameters
        theirs = inspect.signature(getattr(CeleryConsumer, name)).parameters
        assert list(theirs) == list(ours), name
