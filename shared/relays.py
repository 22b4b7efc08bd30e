"""Which SMTP relay a message goes through, and how a relay URL is read.

One rule: the request's relay (``connection``), else the solution's own
(``connection_server``…), else the default (``POSTROOM_DEFAULT_SMTP_URL``). The intake
applies the first two (:func:`chosen_relay`, into the job's relay spec); a job without a
spec goes through the default (:meth:`Relay.of_job`, in the worker).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

from postroom.shared.errors import ConfigError
from postroom.shared.records import Connection, RelaySpec

SCHEMES = ("smtp", "smtps", "")
DEFAULT_PORTS = {"smtp": 587, "smtps": 465, "": 25}


def relay_port(port: int | None, scheme: str) -> int:
    """``port``, or the scheme's default when none is given (587, 465, 25): the one place
    that says which port a scheme defaults to."""
    return DEFAULT_PORTS[scheme] if not port else int(port)


def configured_relay(config: Mapping[str, Any]) -> RelaySpec | None:
    """A solution configuration's own relay (its password as stored: sealed), or None."""
    host = config.get("connection_server")
    if not host:
        return None
    scheme = config.get("connection_scheme")
    scheme = "smtp" if scheme is None else str(scheme)
    return {
        "host": str(host),
        "port": relay_port(config.get("connection_port"), scheme),
        "scheme": scheme,
        "user": config.get("connection_user") or None,
        "password": config.get("connection_password") or None,
    }


def chosen_relay(
    connection: Connection | None,
    config: Mapping[str, Any],
    seal: Callable[[str], str],
) -> RelaySpec | None:
    """The caller's relay: the request's ``connection`` (its password sealed with ``seal``),
    else the solution's own; None for the default."""
    if not connection:
        return configured_relay(config)
    password = connection.get("password")
    scheme = connection.get("scheme", "smtp")
    return {
        "host": connection["server"],
        "port": relay_port(connection.get("port"), scheme),
        "scheme": scheme,
        "user": connection.get("user") or None,
        "password": seal(password) if password else None,
    }


@dataclass(frozen=True)
class Relay:
    """An SMTP relay. ``scheme``: ``smtp`` = STARTTLS required, ``smtps`` = implicit TLS,
    ``""`` = plain text. ``caller_chosen`` relays go through the address guard."""

    host: str
    port: int
    scheme: str = "smtp"
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    caller_chosen: bool = True

    @classmethod
    def of_job(
        cls, spec: RelaySpec | None, default: Relay | None, unseal: Callable[[str], str]
    ) -> Relay | None:
        """The relay a job goes through: its spec (password unsealed), else ``default``."""
        if not spec:
            return default
        password = spec.get("password")
        return cls(
            host=spec["host"],
            port=int(spec["port"]),
            scheme=spec["scheme"],
            user=spec.get("user"),
            password=unseal(password) if password else None,
            caller_chosen=True,
        )


def parse_relay_url(url: str) -> Relay:
    """``smtp://user:pass@host:587`` (STARTTLS), ``smtps://…:465``, ``smtp+plain://host:25``."""
    parts = urlsplit(url)
    scheme_map = {"smtp": "smtp", "smtps": "smtps", "smtp+plain": ""}
    if parts.scheme not in scheme_map:
        raise ConfigError(
            "POSTROOM_DEFAULT_SMTP_URL must start with smtp://, smtps:// or smtp+plain://"
        )
    scheme = scheme_map[parts.scheme]
    if not parts.hostname:
        raise ConfigError("POSTROOM_DEFAULT_SMTP_URL has no host")
    try:
        port = relay_port(parts.port, scheme)
    except ValueError:
        raise ConfigError("POSTROOM_DEFAULT_SMTP_URL has an invalid port") from None
    return Relay(
        host=parts.hostname,
        port=port,
        scheme=scheme,
        user=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        caller_chosen=False,
    )
