"""API keys: 32 random bytes (secrets.token_urlsafe) behind a `yun-` prefix, shown once,
stored only as their SHA-256. A key has 256 bits of entropy, so a fast hash is enough (a
slow one like argon2 protects guessable passwords, not random keys); the lookup is by
hash, and the stored hash is compared to the computed one with hmac.compare_digest."""

from __future__ import annotations

import hashlib
import hmac
import secrets

KEY_PREFIX = "yun-"
SHOWN_CHARS = 8  # how many characters of a key `keys list` shows (prefix included)


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def shown_prefix(key: str) -> str:
    return key[:len(KEY_PREFIX) + SHOWN_CHARS]


def hashes_match(stored: str, given: str) -> bool:
    return hmac.compare_digest(stored.encode(), given.encode())


def bearer_token(authorization: bytes) -> str:
    """The token of an `Authorization: Bearer TOKEN` header ('' if there is none)."""
    value = authorization.strip()
    if value[:7].lower() != b"bearer ":
        return ""
    return value[7:].strip().decode("latin-1")
