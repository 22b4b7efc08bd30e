"""Small conversions for values read from Redis (bytes, typed as ``bytes | str``)."""

from __future__ import annotations


def as_str(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
