"""The API key format: ``bl-`` + 32 random base62 characters + a 6-character checksum.

32 base62 characters carry 190 bits of randomness. The checksum (CRC-32 of
the random part, in base62) lets the gateway refuse a mistyped or made-up key
without a Redis call, the way GitHub's tokens do. At rest only the SHA-256 of
the whole key is kept.
"""

from __future__ import annotations

import hashlib
import secrets
import zlib

PREFIX = "bl-"
_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_ALPHABET_SET = frozenset(_ALPHABET)
_BODY_LEN = 32
_CHECK_LEN = 6
KEY_LEN = len(PREFIX) + _BODY_LEN + _CHECK_LEN


def _checksum(body: str) -> str:
    n = zlib.crc32(body.encode("ascii"))
    out = []
    for _ in range(_CHECK_LEN):
        n, r = divmod(n, 62)
        out.append(_ALPHABET[r])
    return "".join(reversed(out))


def generate() -> str:
    """A new random key. Show it once; store only :func:`hash_key` of it."""
    body = "".join(secrets.choice(_ALPHABET) for _ in range(_BODY_LEN))
    return PREFIX + body + _checksum(body)


def is_well_formed(key: str) -> bool:
    """Prefix, length, alphabet and checksum are right (no I/O)."""
    if len(key) != KEY_LEN or not key.startswith(PREFIX):
        return False
    rest = key[len(PREFIX) :]
    if not _ALPHABET_SET.issuperset(rest):
        return False
    body, check = rest[:_BODY_LEN], rest[_BODY_LEN:]
    return secrets.compare_digest(_checksum(body), check)


def hash_key(key: str) -> str:
    """The SHA-256 (hex) under which a key's record is stored."""
    return hashlib.sha256(key.encode("ascii")).hexdigest()


def display_prefix(key: str) -> str:
    """The part of a key that may be shown in lists to tell keys apart."""
    return key[: len(PREFIX) + 6]


def check_hash(value: object) -> str:
    """``value`` if it is a key hash as :func:`hash_key` writes it (64 lowercase hex)."""
    if not isinstance(value, str) or len(value) != 64 or value.strip("0123456789abcdef"):
        raise ValueError("not a key hash (64 lowercase hex characters)")
    return value
