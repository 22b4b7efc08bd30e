"""The relay address guard: a caller-chosen relay may not point inside our network.

Resolve the host once, check every address, then connect to the checked address (never
a second lookup that a rebinding DNS server could answer differently).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Sequence

from shared.errors import InvalidRelay

Resolver = Callable[[str, int], Sequence[str]]

_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")
_6TO4 = ipaddress.ip_network("2002::/16")

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def system_resolver(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    seen: list[str] = []
    for info in infos:
        addr = str(info[4][0])
        if addr not in seen:
            seen.append(addr)
    return seen


def _embedded_v4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _NAT64 or ip in _NAT64_LOCAL:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip in _6TO4:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    return None


def is_public(ip: IpAddress) -> bool:
    if isinstance(ip, ipaddress.IPv6Address):
        inner = _embedded_v4(ip)
        if inner is not None:
            return is_public(inner)
    if ip.version == 4 and ip in _CGNAT:
        return False
    return not (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
        or not ip.is_global
    )


class RelayGuard:
    def __init__(
        self,
        allow_hosts: Sequence[str],
        allow_ports: Sequence[int],
        resolver: Resolver = system_resolver,
    ) -> None:
        self._hosts = {h.lower().rstrip(".") for h in allow_hosts if "/" not in h}
        self._nets: list[IpNetwork] = []
        for entry in allow_hosts:
            try:
                self._nets.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                continue
        self._ports = set(allow_ports)
        self._resolve = resolver

    def _allowed_address(self, ip: IpAddress) -> bool:
        return any(ip in net for net in self._nets)

    def check(self, host: str, port: int) -> str:
        """The address to connect to, or InvalidRelay. Never names what it found inside."""
        name = host.lower().rstrip(".")
        if name in self._hosts:
            return self._first(host, port)
        try:
            addresses = self._resolve(host, port)
        except (OSError, UnicodeError):
            raise InvalidRelay(f"the relay host {host!r} could not be resolved") from None
        if not addresses:
            raise InvalidRelay(f"the relay host {host!r} could not be resolved")
        ips = [ipaddress.ip_address(a.split("%")[0]) for a in addresses]
        if all(self._allowed_address(ip) for ip in ips):
            return addresses[0]
        if port not in self._ports:
            raise InvalidRelay(
                f"relay port {port} is not allowed (allowed: "
                f"{', '.join(str(p) for p in sorted(self._ports))})"
            )
        for ip in ips:
            if not (is_public(ip) or self._allowed_address(ip)):
                raise InvalidRelay(
                    f"the relay host {host!r} resolves to a non-public address, which is "
                    "not allowed"
                )
        return addresses[0]

    def _first(self, host: str, port: int) -> str:
        try:
            addresses = self._resolve(host, port)
        except (OSError, UnicodeError):
            raise InvalidRelay(f"the relay host {host!r} could not be resolved") from None
        if not addresses:
            raise InvalidRelay(f"the relay host {host!r} could not be resolved")
        return addresses[0]
