"""What the admin API accepts: strict bodies and well-shaped ids.

Strict means: an unknown field anywhere, nested objects included, is a 400
naming it; a boolean is not a number (``expires_at: false`` once made an
expired key); ``null`` is taken only where it means something (``expires_at``,
a limit) and refused elsewhere, naming the field, instead of failing later as
a 500; numbers stay within what the stores and the page can hold. The models'
JSON schemas are the OpenAPI document's, so they describe exactly this.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from shared.errors import NotFound
from shared.priority import Priority
from shared.records import MAX_ENDPOINTS, ContentKind, Limits

# Ids as shared.records.new_id makes them; anything else names no record (and must
# not reach Redis: "bot_x:keys" is another record's key).
BOT_ID = r"^bot_[0-9a-f]{16}$"
KEY_ID = r"^key_[0-9a-f]{16}$"
_BOT_ID = re.compile(BOT_ID)
_KEY_ID = re.compile(KEY_ID)
# Epoch milliseconds up to JavaScript's largest exact integer (the admin page).
MAX_MS = 2**53 - 1
# Far above any real use, far below what a 64-bit counter or a Lua number holds.
MAX_COUNT = 10**9

_STRICT = ConfigDict(extra="forbid", strict=True)


def bot_id(value: str) -> str:
    """``value`` if it is shaped like a bot id, else 404."""
    if not _BOT_ID.match(value):
        raise NotFound("no such bot", param="bot_id")
    return value


def key_id(value: str) -> str:
    """``value`` if it is shaped like a key id, else 404."""
    if not _KEY_ID.match(value):
        raise NotFound("no such key", param="key_id")
    return value


def _not_nullable(schema: dict[str, Any]) -> None:
    """The field's schema without the ``null`` pydantic adds for ``X | None``."""
    schema.pop("default", None)
    branches = [b for b in schema.pop("anyOf", []) if b != {"type": "null"}]
    if len(branches) == 1:
        schema.update(branches[0])
    elif branches:
        schema["anyOf"] = branches


def _unchanged(**constraints: Any) -> Any:
    """A PATCH field: left out, it stays as it is; ``null`` is refused (see ``_not_null``)."""
    return Field(None, json_schema_extra=_not_nullable, **constraints)


class LimitsInput(BaseModel):
    """Limits as the admin API takes them; ``null`` or left out: no limit."""

    model_config = _STRICT

    rpm: int | None = Field(None, ge=1, le=MAX_COUNT, description="requests per minute")
    tpm: int | None = Field(
        None, ge=1, le=MAX_COUNT, description="tokens (prompt + completion) per minute"
    )
    concurrency: int | None = Field(
        None, ge=1, le=MAX_COUNT, description="requests in flight at once"
    )

    def limits(self) -> Limits:
        """The stored form."""
        return Limits(**self.model_dump())


class EndpointInput(BaseModel):
    """One entry of a bot's ordered endpoints."""

    model_config = _STRICT

    name: str = Field(min_length=1, max_length=200)
    weight: int = Field(1, ge=1, le=1000, description="share of traffic within its tier")
    tier: int | None = Field(
        None, ge=0, le=1000, description="tried in ascending order; default: the position"
    )


def _endpoints(**constraints: Any) -> Any:
    return Field(
        None,
        min_length=1,
        max_length=MAX_ENDPOINTS,
        description="ordered fallbacks, weighted within a tier; the first is `endpoint`",
        **constraints,
    )


class BotInput(BaseModel):
    """A new bot: one ``endpoint`` (default ``echo``), or an ordered list ``endpoints``."""

    model_config = _STRICT

    name: str = Field(min_length=1, max_length=200)
    endpoint: str | None = Field(None, min_length=1, max_length=200)
    endpoints: list[EndpointInput] | None = _endpoints()
    model: str = Field("echo", min_length=1, max_length=200)
    system_prompt: str = ""
    temperature: float = Field(0.7, ge=0, le=2)
    top_p: float = Field(0.7, ge=0, le=1)
    max_reply_tokens: int = Field(2048, ge=1, le=MAX_COUNT)
    max_history_messages: int = Field(10, ge=1, le=MAX_COUNT)
    allowed_content: list[ContentKind] = Field(
        default_factory=list, max_length=3, description="non-text content parts callers may send"
    )
    limits: LimitsInput = LimitsInput()
    priority: Priority = Field("normal", description="high, normal or low: who goes first")

    @model_validator(mode="after")
    def _first_endpoint(self) -> BotInput:
        if self.endpoints and self.endpoint not in (None, self.endpoints[0].name):
            raise ValueError("endpoint must be the first of endpoints (or leave it out)")
        if self.endpoint is None and not self.endpoints:
            self.endpoint = "echo"
        return self

    def fields(self) -> dict[str, Any]:
        """The bot's fields as the registry takes them."""
        return self.model_dump(exclude_none=True)


class _Patch(BaseModel):
    """A PATCH body: ``null`` is refused for every field but those in ``nullable``."""

    model_config = _STRICT
    nullable: ClassVar[frozenset[str]] = frozenset()

    @field_validator("*", mode="before")
    @classmethod
    def _not_null(cls, value: Any, info: Any) -> Any:
        if value is None and info.field_name not in cls.nullable:
            raise ValueError("may not be null; leave the field out to keep it")
        return value


class BotPatch(_Patch):
    """Changes to a bot; fields left out stay as they are."""

    name: str | None = _unchanged(min_length=1, max_length=200)
    endpoint: str | None = _unchanged(min_length=1, max_length=200)
    endpoints: list[EndpointInput] | None = _endpoints(json_schema_extra=_not_nullable)
    model: str | None = _unchanged(min_length=1, max_length=200)
    system_prompt: str | None = _unchanged()
    temperature: float | None = _unchanged(ge=0, le=2)
    top_p: float | None = _unchanged(ge=0, le=1)
    max_reply_tokens: int | None = _unchanged(ge=1, le=MAX_COUNT)
    max_history_messages: int | None = _unchanged(ge=1, le=MAX_COUNT)
    allowed_content: list[ContentKind] | None = _unchanged(max_length=3)
    limits: LimitsInput | None = _unchanged(
        description="replaces all three limits; a limit left out is none"
    )
    priority: Priority | None = _unchanged()

    @model_validator(mode="after")
    def _one_first_endpoint(self) -> BotPatch:
        # Both given: they must agree, as when a bot is created.
        if self.endpoints and self.endpoint is not None and self.endpoint != self.endpoints[0].name:
            raise ValueError("endpoint must be the first of endpoints (or leave it out)")
        return self


class KeyInput(BaseModel):
    """A new key."""

    model_config = _STRICT

    name: str = Field("", max_length=200)
    expires_at: int | None = Field(None, ge=0, le=MAX_MS, description="epoch milliseconds")
    limits: LimitsInput = LimitsInput()
    priority: Priority | None = Field(None, description="high, normal or low; none: the bot's")


class KeyPatch(_Patch):
    """Changes to a key; ``expires_at: null`` clears the expiry."""

    nullable: ClassVar[frozenset[str]] = frozenset({"expires_at", "priority"})

    name: str | None = _unchanged(max_length=200)
    disabled: bool | None = _unchanged()
    expires_at: int | None = Field(
        None, ge=0, le=MAX_MS, description="epoch milliseconds; null: never"
    )
    limits: LimitsInput | None = _unchanged(
        description="replaces all three limits; a limit left out is none"
    )
    priority: Priority | None = Field(None, description="high, normal or low; null: the bot's")
