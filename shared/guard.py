"""The relay address guard: a caller-chosen relay may not point inside our network.

A relay named in a request (``connection.server``) or in a solution's configuration
(``connection_server``) is someone else's choice of where our workers open a TCP
connection, so it is checked before any connection is made:

- every address the host resolves to must be public: loopback, private, link-local,
  CGNAT (100.64/10), multicast, unspecified, reserved, documentation, benchmarking and
  site-local addresses are refused; IPv4-mapped (``::ffff:a.b.c.d``) and NAT64
  (``64:ff9b::/96``) addresses are judged by the IPv4 address they carry; 6to4
  (``2002::/16``), Teredo (``2001::/32``) and local-use NAT64 (``64:ff9b:1::/48``) are
  refused whatever they carry (no relay needs them);
- a host that spells an address is read as the system resolver reads it, odd spellings
  included (``127.1``, ``2130706433``, ``0x7f.1``, ``0177.0.0.1``, ``[::1]``), so it
  needs no lookup and cannot slip past;
- the port must be one of ``POSTROOM_SMTP_ALLOW_PORTS`` (25, 465, 587, 2525);
- plain text (scheme ``""``) is allowed only toward an exempt relay.

``POSTROOM_SMTP_ALLOW_HOSTS`` (host names, addresses, CIDRs) exempts a relay from all of
it: a host named there, or one whose every address lies in a listed address or CIDR.

The worker resolves once, checks every address, then connects to the checked address it
is given (never a second lookup that a rebinding DNS server could answer differently).
Messages never name the address a host resolved to.

Each process keeps a name's answer for :data:`DNS_CACHE_S` seconds (:class:`CachedResolver`):
a solution whose relay is a name costs intake one lookup per process and half-minute, not
one per request. An answer is checked each time it is used, so keeping it lets nothing
through that a fresh lookup would have refused; a failed lookup is not kept.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import threading
import time
from collections.abc import Callable, Sequence

from postroom.shared.errors import ConfigError, InvalidRelay

Resolver = Callable[[str, int], Sequence[str]]
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_REFUSED_V6 = (
    ipaddress.ip_network("64:ff9b:1::/48"),  # local-use NAT64 (RFC 8215)
    ipaddress.ip_network("2002::/16"),  # 6to4
    ipaddress.ip_network("2001::/32"),  # Teredo
)
# one part of an inet_aton() address: hex (0x1f), octal (017, and 0 itself) or decimal
_PART = re.compile(r"0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*")

PLAIN_TEXT_REFUSED = (
    'plain text (scheme "") is allowed only toward relays listed in '
    "POSTROOM_SMTP_ALLOW_HOSTS; use \"smtp\" (STARTTLS) or \"smtps\" (implicit TLS)"
)


def system_resolver(host: str, port: int) -> list[str]:
    """The addresses of ``host``, as the system resolver gives them, without repeats."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    seen: list[str] = []
    for info in infos:
        addr = str(info[4][0])
        if addr not in seen:
            seen.append(addr)
    return seen


#: seconds a process keeps a relay name's addresses
DNS_CACHE_S = 30.0
#: relay names a process keeps (the oldest is dropped first)
DNS_CACHE_NAMES = 1024


class CachedResolver:
    """``resolver``'s answers, kept ``ttl_s`` seconds for at most ``max_names`` names; a
    lookup that fails is not kept (the next one asks again). Safe under threads."""

    def __init__(
        self,
        resolver: Resolver = system_resolver,
        ttl_s: float = DNS_CACHE_S,
        max_names: int = DNS_CACHE_NAMES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._resolve = resolver
        self._ttl_s = ttl_s
        self._max_names = max_names
        self._clock = clock
        self._kept: dict[tuple[str, int], tuple[float, list[str]]] = {}
        self._lock = threading.Lock()

    def __call__(self, host: str, port: int) -> Sequence[str]:
        key = (_name(host), port)
        kept = self._kept.get(key)
        now = self._clock()
        if kept is not None and now < kept[0]:
            return kept[1]
        answers = list(self._resolve(host, port))
        with self._lock:
            self._kept.pop(key, None)
            while len(self._kept) >= self._max_names:
                del self._kept[next(iter(self._kept))]
            self._kept[key] = (now + self._ttl_s, answers)
        return answers


def parse_literal(host: str) -> IpAddress | None:
    """The address ``host`` spells, or None when it is a name.

    Reads IPv6 with or without brackets (a zone id is dropped) and IPv4 as ``inet_aton``
    does: one to four parts, each decimal, octal (leading 0) or hex (0x), the last part
    filling the remaining bytes (``127.1`` is 127.0.0.1, ``2130706433`` too).
    """
    text = host.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        return ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        pass
    return _inet_aton(text)


def _inet_aton(text: str) -> ipaddress.IPv4Address | None:
    parts = text.split(".")
    if not 1 <= len(parts) <= 4 or not all(_PART.fullmatch(p) for p in parts):
        return None
    values = [int(p, 0) if p[:2].lower() == "0x" else int(p, 8 if p[0] == "0" else 10)
              for p in parts]
    *leading, last = values
    if any(v > 0xFF for v in leading) or last >= 1 << (8 * (4 - len(leading))):
        return None
    number = 0
    for v in leading:
        number = number << 8 | v
    return ipaddress.IPv4Address(number << (8 * (4 - len(leading))) | last)


def _unmapped(ip: IpAddress) -> IpAddress:
    """``::ffff:a.b.c.d`` is a.b.c.d (what a dual-stack socket connects to)."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def is_public(ip: IpAddress) -> bool:
    """Whether a caller may have us connect to ``ip``."""
    ip = _unmapped(ip)
    if isinstance(ip, ipaddress.IPv6Address):
        if ip in _NAT64:
            return is_public(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        if any(ip in net for net in _REFUSED_V6) or ip.is_site_local:
            return False
    elif ip in _CGNAT:
        return False
    return ip.is_global and not (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
    )


class RelayGuard:
    """Checks caller-chosen relays against the address rules and the allow lists."""

    def __init__(
        self,
        allow_hosts: Sequence[str],
        allow_ports: Sequence[int],
        resolver: Resolver = system_resolver,
    ) -> None:
        self._names: set[str] = set()
        self._nets: list[IpNetwork] = []
        for entry in allow_hosts:
            entry = entry.strip()
            literal = parse_literal(entry)
            if literal is not None:
                literal = _unmapped(literal)
                self._nets.append(ipaddress.ip_network(literal))
            elif "/" in entry:
                try:
                    self._nets.append(ipaddress.ip_network(entry, strict=False))
                except ValueError:
                    raise ConfigError(
                        f"POSTROOM_SMTP_ALLOW_HOSTS: {entry!r} is not a valid CIDR"
                    ) from None
            elif entry:
                self._names.add(_name(entry))
        self._ports = frozenset(allow_ports)
        self._resolve = resolver

    # -- the two checks -------------------------------------------------------------

    def check(self, host: str, port: int, scheme: str | None = None) -> str:
        """The worker's check at connect time: the address to connect to, or InvalidRelay.

        ``host`` must resolve; ``scheme`` ``""`` (plain text) needs an exempt relay.
        """
        addresses = self._addresses(host, port)
        if addresses is None:
            raise InvalidRelay(f"the relay host {host!r} could not be resolved")
        exempt = self._judge(host, port, addresses)
        if scheme == "" and not exempt:
            raise InvalidRelay(PLAIN_TEXT_REFUSED)
        return str(_unmapped(addresses[0]))

    def precheck(self, host: str, port: int) -> bool:
        """Intake's check: InvalidRelay when the relay is refused now. A name that does not
        resolve passes (the worker decides, at connect time). Returns whether the relay is
        exempt (allowed by ``POSTROOM_SMTP_ALLOW_HOSTS``): only then may it be plain text."""
        addresses = self._addresses(host, port)
        if addresses is None:
            exempt = _name(host) in self._names
            if not exempt:
                self._check_port(port)
            return exempt
        return self._judge(host, port, addresses)

    # -- internals --------------------------------------------------------------------

    def _addresses(self, host: str, port: int) -> list[IpAddress] | None:
        literal = parse_literal(host)
        if literal is not None:
            return [literal]
        try:
            answers = self._resolve(host, port)
            addresses = [ipaddress.ip_address(a.split("%", 1)[0]) for a in answers]
        except (OSError, UnicodeError, ValueError):
            return None
        return addresses or None

    def _judge(self, host: str, port: int, addresses: list[IpAddress]) -> bool:
        """Raise InvalidRelay for a refused relay; return whether it is exempt."""
        if _name(host) in self._names or all(self._listed(ip) for ip in addresses):
            return True
        self._check_port(port)
        if not all(is_public(ip) or self._listed(ip) for ip in addresses):
            raise InvalidRelay(
                f"the relay host {host!r} is not a public address (loopback, private, "
                "link-local and other internal addresses are refused)"
            )
        return False

    def _listed(self, ip: IpAddress) -> bool:
        ip = _unmapped(ip)
        return any(ip.version == net.version and ip in net for net in self._nets)

    def _check_port(self, port: int) -> None:
        if port not in self._ports:
            allowed = ", ".join(str(p) for p in sorted(self._ports))
            raise InvalidRelay(f"relay port {port} is not allowed (allowed: {allowed})")


def _name(host: str) -> str:
    return host.strip().lower().rstrip(".")
