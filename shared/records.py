"""Bots and key records: what Redis holds and the gateway resolves per request."""

from __future__ import annotations

import secrets
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from shared.priority import Priority
from shared.wire import EndpointRef

MAX_ENDPOINTS = 16


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
    endpoint: str = Field(
        min_length=1, description="a model endpoint the workers know; the first of `endpoints`"
    )
    # Ordered fallbacks (tiers, weights within a tier); a bot stored before
    # this field existed, or created with one ``endpoint``, gets that one.
    endpoints: list[EndpointRef] = Field(default_factory=list, max_length=MAX_ENDPOINTS)
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
    # The class of its keys' jobs under a backlog (a key may set its own).
    priority: Priority = Field("normal", description="high, normal or low: who goes first")
    created_at: int = Field(0, description="epoch milliseconds")

    @model_validator(mode="before")
    @classmethod
    def _one_or_many(cls, data: Any) -> Any:
        """``endpoint`` alone, ``endpoints`` alone, or both agreeing on the first."""
        if not isinstance(data, dict):
            return data
        endpoint, endpoints = data.get("endpoint"), data.get("endpoints")
        if endpoints:
            first = endpoints[0]
            name = first.name if isinstance(first, EndpointRef) else first.get("name")
            if not endpoint:
                return data | {"endpoint": name}
            if endpoint != name:
                raise ValueError("endpoint must be the first of endpoints")
            return data
        if endpoint:
            return data | {"endpoints": [{"name": endpoint}]}
        return data

    def endpoint_plan(self) -> list[EndpointRef]:
        """The endpoints in tier order, each with its tier set (its position if none)."""
        resolved = [
            ref if ref.tier is not None else ref.model_copy(update={"tier": i})
            for i, ref in enumerate(self.endpoints)
        ]
        return sorted(resolved, key=lambda ref: ref.tier or 0)


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
    # None: the bot's priority.
    priority: Priority | None = None
    last_used_at: int | None = None

    def expired(self, now_ms: int) -> bool:
        """Whether the key is past its expiry at ``now_ms``."""
        return self.expires_at is not None and now_ms >= self.expires_at
