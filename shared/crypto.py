"""Secrets at rest and in flight: Fernet for SMTP passwords, hashes for tokens."""

from __future__ import annotations

import hashlib
import hmac
import secrets

from cryptography.fernet import Fernet, InvalidToken

from postroom.shared.errors import ConfigError


def generate_key() -> str:
    return Fernet.generate_key().decode()


def check_key(key: str) -> None:
    try:
        Fernet(key.encode())
    except (ValueError, TypeError):
        raise ConfigError(
            "POSTROOM_SECRET_KEY is not a valid Fernet key (32 url-safe base64-encoded bytes); "
            "generate one with `postroom keygen`"
        ) from None


class SecretBox:
    """Encrypts and decrypts SMTP passwords with the service's secret key."""

    def __init__(self, key: str) -> None:
        check_key(key)
        self._fernet = Fernet(key.encode())

    def encrypt(self, plaintext: str) -> str:
        return self._fernet.encrypt(plaintext.encode()).decode()

    def decrypt(self, token: str) -> str:
        try:
            return self._fernet.decrypt(token.encode()).decode()
        except InvalidToken:
            raise ConfigError(
                "a stored secret cannot be decrypted: was POSTROOM_SECRET_KEY changed?"
            ) from None


def new_token() -> str:
    return "pr_" + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def tokens_equal(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())
