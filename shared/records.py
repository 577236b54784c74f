"""Bots and key records: what Redis holds and the gateway resolves per request."""

from __future__ import annotations

import secrets
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


def new_id(prefix: str) -> str:
    """A short random id such as ``bot_3f9a0c1d2e4b5a67``."""
    return f"{prefix}_{secrets.token_hex(8)}"


class Limits(BaseModel):
    """Per-key limits; None means no limit (on a key: the bot's default applies)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    rpm: int | None = Field(None, ge=1, description="requests per minute")
    tpm: int | None = Field(None, ge=1, description="tokens (prompt + completion) per minute")
    concurrency: int | None = Field(None, ge=1, description="requests in flight at once")

    def over(self, defaults: Limits) -> Limits:
        """These limits, with ``defaults`` where unset."""
        return Limits(
            rpm=self.rpm or defaults.rpm,
            tpm=self.tpm or defaults.tpm,
            concurrency=self.concurrency or defaults.concurrency,
        )

    @property
    def any(self) -> bool:
        """Whether any limit is set."""
        return bool(self.rpm or self.tpm or self.concurrency)


# Kinds of non-text content a bot may be sent (OpenAI's image_url, input_audio, file parts).
ContentKind = Literal["image", "audio", "file"]


class Bot(BaseModel):
    """A configured bot: which model answers, and how."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    id: str
    name: str
    endpoint: str = Field(min_length=1, description="a model endpoint the workers know")
    model: str = Field(min_length=1)
    system_prompt: str = ""
    temperature: float = Field(0.7, ge=0, le=2)
    top_p: float = Field(0.7, ge=0, le=1)
    max_reply_tokens: int = Field(2048, ge=1)
    max_history_messages: int = Field(10, ge=1)
    # Non-text content parts the model may be sent; a model server that fetches an
    # image_url would otherwise fetch any address a caller names.
    allowed_content: list[ContentKind] = Field(
        default_factory=list, description="non-text content parts callers may send"
    )
    # Defaults for the bot's keys; each key may set its own.
    limits: Limits = Limits()
    created_at: int = Field(0, description="epoch milliseconds")


class KeyRecord(BaseModel):
    """Everything known about a key except the key itself."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    key_id: str
    bot_id: str
    name: str = ""
    prefix: str
    created_at: int
    expires_at: int | None = None
    disabled: bool = False
    limits: Limits = Limits()
    last_used_at: int | None = None

    def expired(self, now_ms: int) -> bool:
        """Whether the key is past its expiry at ``now_ms``."""
        return self.expires_at is not None and now_ms >= self.expires_at
