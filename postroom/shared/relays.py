"""Which SMTP relay a message goes through, and how a relay URL is read."""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from postroom.shared.errors import ConfigError

SCHEMES = ("smtp", "smtps", "")
DEFAULT_PORTS = {"smtp": 587, "smtps": 465, "": 25}


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
        port = parts.port or DEFAULT_PORTS[scheme]
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
