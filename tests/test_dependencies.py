"""The dependency ranges in pyproject.toml hold for what is installed, and the library
internals postroom reaches into are there in the installed versions."""

from __future__ import annotations

import inspect
import re
from importlib import metadata

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

#: the libraries whose internals postroom reaches into, and where
FENCED = ("celery", "kombu", "amqp", "redis", "gunicorn", "email-validator", "jinja2",
          "prometheus-client")


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


def test_the_fence_names_the_ranges_pyproject_declares_and_versions_within_them() -> None:
    """shared/celery_wire's docstring states the versions it is written for and the
    ranges of pyproject.toml: the ranges it names are the declared ones, each library it
    is written for is named with a range, and each such version lies in its range."""
    import postroom.shared.celery_wire as fence

    doc = " ".join((fence.__doc__ or "").split())
    named = {Requirement(spec).name: Requirement(spec).specifier
             for spec in re.findall(r"``([a-z][\w-]*(?:[<>=!]=?[\d.]+,?)+)``", doc)}
    declared = requirements()
    assert {"celery", "kombu", "amqp"} <= set(named), named
    for name, specifier in named.items():
        assert declared[name].specifier == specifier, (name, str(specifier))
    written_for = dict(
        (name.lower().replace("py-", ""), version)
        for name, version in re.findall(r"(Celery|kombu|py-amqp) (\d+(?:\.\d+)+)", doc)
    )
    assert set(written_for) == {"celery", "kombu", "amqp"}, written_for
    for name, version in written_for.items():
        assert named[name].contains(Version(version)), (name, version, str(named[name]))
        installed = Version(metadata.version(name))
        assert installed >= Version(version), (name, str(installed))


def test_kombu_takes_the_unacked_restore_options_postroom_sets() -> None:
    """The Redis transport options of shared/queue.py exist in the installed kombu (5.7
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
    """postroom.shared.celery_wire.dead_letters.Consumer overrides four handlers of Celery's
    consumer: each
    exists there with the same parameters."""
    from celery.worker.consumer import Consumer as CeleryConsumer

    from postroom.shared.celery_wire.dead_letters import Consumer

    for name in ("on_unknown_message", "on_unknown_task", "on_invalid_task",
                 "on_decode_error"):
        ours = inspect.signature(getattr(Consumer, name)).parameters
        theirs = inspect.signature(getattr(CeleryConsumer, name)).parameters
        assert list(theirs) == list(ours), name


def test_kombu_has_the_private_parts_the_redis_transport_reaches_into() -> None:
    """shared/celery_wire/redis_transport.py overrides or calls these parts of kombu's
    Redis transport; each exists in the installed kombu, the overridden ones with the
    parameters the subclass gives them."""
    from kombu.transport import redis as kombu_redis
    from kombu.transport.virtual import base as virtual

    from postroom.shared.celery_wire import redis_transport as ours

    overridden: list[tuple[type, str]] = [(kombu_redis.Channel, "_brpop_read"),
                                          (kombu_redis.Channel, "_create_client"),
                                          (kombu_redis.QoS, "_remove_from_indices")]
    for cls, name in overridden:
        theirs = inspect.signature(getattr(cls, name)).parameters
        mine = inspect.signature(getattr(getattr(ours, cls.__name__), name)).parameters
        assert list(mine) == list(theirs), name
    called: list[tuple[type, str]] = [(kombu_redis.Channel, "_q_for_pri"),
                                      (kombu_redis.QoS, "pipe_or_acquire"),
                                      (kombu_redis.QoS, "restore_by_tag"),
                                      (virtual.QoS, "can_consume_max_estimate"),
                                      (virtual.Transport, "_deliver")]
    for cls, name in called:
        assert callable(getattr(cls, name, None)), name
    assert (ours.UNACKED, ours.UNACKED_INDEX) == ("unacked", "unacked_index")
    # the raw payload kept on a delivered message, written back into the unacked record
    assert "self._raw = payload" in inspect.getsource(virtual.Message.__init__)


def test_prometheus_client_says_whether_it_counts_in_files() -> None:
    """shared/metrics_files.py tells multiprocess mode by ``ValueClass._multiprocess``:
    False for the plain value class, True for the one multiprocess mode makes."""
    from prometheus_client import values

    assert values.MutexValue._multiprocess is False
    assert values.MultiProcessValue()._multiprocess is True
