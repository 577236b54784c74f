"""Bots and key records: what Redis holds and the gateway resolves per request."""

from __future__ import annotations

import secrets

from pydantic import BaseModel, ConfigDict, Field


def new_id(prefix: str) -> str:
    """A short random id such as ``bot_3f9a0c1d2e4b5a67``."""
    return f"{prefix}_{secrets.token_hex(8)}"


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
    last_used_at: int | None = None

    def expired(self, now_ms: int) -> bool:
        """Whether the key is past its expiry at ``now_ms``."""
        return self.expires_at is not None and now_ms >= self.expires_at
