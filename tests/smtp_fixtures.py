"""pytest fixtures around :mod:`tests.smtp_server` (load with ``pytest_plugins``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from postroom.dev.embedded_redis import free_port
from tests.delay_proxy import DelayProxy
from tests.smtp_server import ScriptedSmtpServer, SilentServer, TlsFiles, make_tls_files

#: the round trip of ``far_relay``: a relay 30 ms away
RTT_S = 0.03


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """A test CA (``ca_file``, to pass as a CA file) and a certificate it signed for
    ``localhost`` and 127.0.0.1, made once per test session."""
    directory: Path = tmp_path_factory.mktemp("smtp-tls")
    return make_tls_files(directory)


@pytest.fixture
def make_smtp_server(tls_files: TlsFiles) -> Iterator[Callable[..., ScriptedSmtpServer]]:
    """Start a :class:`ScriptedSmtpServer` with the given options (``tls``, ``auth``,
    ``script``); every server started is stopped after the test."""
    started: list[ScriptedSmtpServer] = []

    def make(**options: Any) -> ScriptedSmtpServer:
        if options.get("tls"):
            options.setdefault("tls_files", tls_files)
        server = ScriptedSmtpServer(**options).start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


@pytest.fixture
def smtp_server(make_smtp_server: Callable[..., ScriptedSmtpServer]) -> ScriptedSmtpServer:
    """A plain-text SMTP server on 127.0.0.1 that accepts everything (script it at will)."""
    return make_smtp_server()


@pytest.fixture
def silent_server() -> Iterator[SilentServer]:
    """A listener on 127.0.0.1 that accepts TCP connections and never sends a greeting."""
    with SilentServer() as server:
        yield server


@pytest.fixture
def closed_port() -> int:
    """A port on 127.0.0.1 where nobody listens (connections are refused)."""
    return free_port()


@pytest.fixture
def relay_server() -> Iterator[ScriptedSmtpServer]:
    """An SMTP server offering PIPELINING (the relay behind ``far_relay``'s proxy)."""
    server = ScriptedSmtpServer(pipelining=True).start()
    yield server
    server.stop()


@pytest.fixture
def far_relay(relay_server: ScriptedSmtpServer) -> Iterator[DelayProxy]:
    """``relay_server``, :data:`RTT_S` away behind a proxy that holds every reply back."""
    with DelayProxy(relay_server.port, RTT_S) as proxy:
        yield proxy
