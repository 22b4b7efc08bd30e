"""Identifiers postroom makes: Message-IDs, and the domain they carry.

Nothing here looks up the local host name (``email.utils.make_msgid`` without a domain calls
``socket.getfqdn()``, which can take milliseconds): the domain is always given.
"""

from __future__ import annotations

import uuid


def sender_domain(address: str) -> str:
    """The domain of ``local@domain``, lower-cased; ``ValueError`` if there is none."""
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        raise ValueError("not an address of the form local@domain")
    return domain.lower()


def make_message_id(domain: str) -> str:
    """``<32 hex digits@domain>``: unique without a clock or a host lookup. A non-ASCII
    domain is written in its IDNA (xn--) form so the header stays ASCII."""
    if not domain.isascii():
        domain = domain.encode("idna").decode("ascii")
    if not domain or any(ch in domain for ch in "<>@ \t\r\n"):
        raise ValueError("not a domain usable in a Message-ID")
    return f"<{uuid.uuid4().hex}@{domain}>"
