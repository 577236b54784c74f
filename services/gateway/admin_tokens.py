"""Admin tokens: how ``BOTLINE_ADMIN_TOKENS`` is read, checked and compared.

A deployment template that writes ``'["${TOKEN}"]'`` with ``TOKEN`` unset gives
an empty token; an empty token must never turn into one that a request with no
``Authorization`` header matches. So blanks are dropped, short tokens stop the
gateway from starting, and a missing bearer never matches anything.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Iterable

from pydantic import SecretStr

SETTING = "BOTLINE_ADMIN_TOKENS"
# 16 characters of a random token are far beyond guessing over HTTP; shorter
# ones are typos or placeholders.
MIN_ADMIN_TOKEN_CHARS = 16


def split_admin_tokens(value: object) -> object:
    """The tokens of a comma-separated or JSON-list setting, stripped, blanks dropped."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                # The message says where, never what: the text holds the tokens.
                raise ValueError(f"{SETTING} starts with '[' but is not a JSON list") from None
        else:
            value = text.split(",")
    if isinstance(value, list | tuple):
        items = [item.get_secret_value() if isinstance(item, SecretStr) else item for item in value]
        stripped = [item.strip() if isinstance(item, str) else item for item in items]
        return [item for item in stripped if item != ""]
    return value


def check_admin_tokens(tokens: Iterable[str]) -> None:
    """Refuse tokens that are blank, short or not printable ASCII (no token in the message)."""
    for n, token in enumerate(tokens, start=1):
        if len(token) < MIN_ADMIN_TOKEN_CHARS:
            raise ValueError(
                f"{SETTING}: token #{n} is {len(token)} characters long; "
                f"each admin token needs at least {MIN_ADMIN_TOKEN_CHARS}"
            )
        if not (token.isascii() and token.isprintable()) or " " in token:
            raise ValueError(f"{SETTING}: token #{n} must be printable ASCII without spaces")


def admin_token_matches(given: str | None, tokens: Iterable[SecretStr]) -> bool:
    """Whether ``given`` is one of ``tokens``, in time that does not say which.

    No bearer, or one that is not ASCII (no configured token is), never matches.
    """
    if not given or not given.isascii():
        return False
    given_bytes = given.encode("ascii")
    matched = False
    for token in tokens:
        secret = token.get_secret_value()
        # A blank could only come from code that bypassed the settings' checks.
        matched |= bool(secret) and hmac.compare_digest(given_bytes, secret.encode("ascii"))
    return matched
