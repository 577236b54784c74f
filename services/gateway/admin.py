"""The admin API under ``/admin/api/``: bots, keys, limits, usage and live workers, as JSON.

Authenticated by the admin tokens from the settings (``BOTLINE_ADMIN_TOKENS``),
compared in constant time. With no token configured the admin API is off:
every call is refused, never open. A key's secret is in the response that
creates it and never again. The routes below are also the source of the
OpenAPI document served at ``/admin/api/openapi.json``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import orjson
from aiohttp import web
from pydantic import BaseModel, ValidationError

from services.gateway.admin_input import BotInput, BotPatch, KeyInput, KeyPatch, bot_id, key_id
from services.gateway.admin_tokens import admin_token_matches
from services.gateway.admission import bearer_token
from services.gateway.bodies import invalid, load_object, read_body
from services.gateway.resources import Gateway, gateway_of
from shared import fleet
from shared.clock import now_ms
from shared.endpoint_state import EndpointState, endpoint_states, known_endpoints
from shared.errors import AdminUnauthorized, NotFound
from shared.records import Bot, KeyRecord


class UsageView(BaseModel):
    """Usage counters."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class KeyView(KeyRecord):
    """A key as the admin API shows it (never the secret)."""

    status: Literal["active", "disabled", "expired"]
    usage: UsageView


class CreatedKey(BaseModel):
    """The answer to creating a key: the secret, shown this once."""

    key: str
    record: KeyView


def _usage_view(counts: dict[str, int]) -> UsageView:
    prompt, completion = counts.get("prompt_tokens", 0), counts.get("completion_tokens", 0)
    return UsageView(
        requests=counts.get("requests", 0),
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
    )


def _status(record: KeyRecord) -> Literal["active", "disabled", "expired"]:
    if record.disabled:
        return "disabled"
    return "expired" if record.expired(now_ms()) else "active"


def _json(payload: Any, status: int = 200) -> web.Response:
    if isinstance(payload, BaseModel):
        payload = payload.model_dump(mode="json")
    return web.Response(body=orjson.dumps(payload), status=status, content_type="application/json")


def _require_admin(request: web.Request) -> Gateway:
    gateway = gateway_of(request)
    tokens = gateway.settings.admin_tokens
    if not tokens:
        raise AdminUnauthorized("the admin API is off: set BOTLINE_ADMIN_TOKENS to turn it on")
    if not admin_token_matches(bearer_token(request), tokens):
        raise AdminUnauthorized("a valid admin token is required")
    return gateway


M = TypeVar("M", bound=BaseModel)


async def _body(request: web.Request, model: type[M]) -> M:
    try:
        return model.model_validate(load_object(await read_body(request)))
    except ValidationError as exc:
        raise invalid(exc) from None


async def _views(gateway: Gateway, records: list[KeyRecord]) -> list[KeyView]:
    names = gateway.registry.names
    counts = await gateway.registry.usage([names.key_usage(r.key_id) for r in records])
    return [
        KeyView(**r.model_dump(), status=_status(r), usage=_usage_view(c))
        for r, c in zip(records, counts, strict=True)
    ]


async def _bot(gateway: Gateway, request: web.Request) -> Bot:
    bot = await gateway.registry.get_bot(bot_id(request.match_info["bot_id"]))
    if bot is None:
        raise NotFound("no such bot", param="bot_id")
    return bot


async def _key(gateway: Gateway, request: web.Request) -> KeyRecord:
    record = await gateway.registry.get_key(key_id(request.match_info["key_id"]))
    if record is None:
        raise NotFound("no such key", param="key_id")
    return record


# --- handlers ----------------------------------------------------------------


async def list_bots(request: web.Request) -> web.Response:
    """All bots."""
    gateway = _require_admin(request)
    return _json([b.model_dump() for b in await gateway.registry.list_bots()])


async def create_bot(request: web.Request) -> web.Response:
    """Create a bot."""
    gateway = _require_admin(request)
    fields = await _body(request, BotInput)
    return _json(await gateway.registry.create_bot(**fields.fields()), status=201)


async def show_bot(request: web.Request) -> web.Response:
    """One bot."""
    gateway = _require_admin(request)
    return _json(await _bot(gateway, request))


async def update_bot(request: web.Request) -> web.Response:
    """Change a bot's settings."""
    gateway = _require_admin(request)
    patch = await _body(request, BotPatch)
    bot = await _bot(gateway, request)
    updated = await gateway.registry.update_bot(bot.id, **patch.model_dump(exclude_unset=True))
    if updated is None:
        raise NotFound("no such bot", param="bot_id")
    return _json(updated)


async def delete_bot(request: web.Request) -> web.Response:
    """Delete a bot; its keys then answer 404 ``bot_not_found``."""
    gateway = _require_admin(request)
    if not await gateway.registry.delete_bot(bot_id(request.match_info["bot_id"])):
        raise NotFound("no such bot", param="bot_id")
    return web.Response(status=204)


async def list_keys(request: web.Request) -> web.Response:
    """A bot's keys, with their usage."""
    gateway = _require_admin(request)
    bot = await _bot(gateway, request)
    await gateway.usage.flush()  # read this gateway's own counts back
    views = await _views(gateway, await gateway.registry.list_keys(bot.id))
    return _json([v.model_dump(mode="json") for v in views])


async def create_key(request: web.Request) -> web.Response:
    """Create a key; the secret is in this response and never again."""
    gateway = _require_admin(request)
    fields = await _body(request, KeyInput)
    bot = await _bot(gateway, request)
    key, record = await gateway.registry.create_key(
        bot.id, fields.name, fields.expires_at, fields.limits.limits(), fields.priority
    )
    (view,) = await _views(gateway, [record])
    return _json(CreatedKey(key=key, record=view), status=201)


async def show_key(request: web.Request) -> web.Response:
    """One key, with its usage."""
    gateway = _require_admin(request)
    await gateway.usage.flush()
    (view,) = await _views(gateway, [await _key(gateway, request)])
    return _json(view)


async def update_key(request: web.Request) -> web.Response:
    """Rename, disable or enable a key, set its expiry or limits."""
    gateway = _require_admin(request)
    patch = await _body(request, KeyPatch)
    record = await _key(gateway, request)
    updated = await gateway.registry.update_key(
        record.key_id, **patch.model_dump(exclude_unset=True)
    )
    if updated is None:
        raise NotFound("no such key", param="key_id")
    (view,) = await _views(gateway, [updated])
    return _json(view)


def _set_disabled(disabled: bool) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(request: web.Request) -> web.Response:
        gateway = _require_admin(request)
        updated = await gateway.registry.set_disabled(
            key_id(request.match_info["key_id"]), disabled
        )
        if updated is None:
            raise NotFound("no such key", param="key_id")
        (view,) = await _views(gateway, [updated])
        return _json(view)

    handler.__doc__ = "Disable a key." if disabled else "Enable a key."
    handler.__name__ = "disable_key" if disabled else "enable_key"
    return handler


async def revoke_key(request: web.Request) -> web.Response:
    """Delete a key for good."""
    gateway = _require_admin(request)
    if not await gateway.registry.revoke(key_id(request.match_info["key_id"])):
        raise NotFound("no such key", param="key_id")
    return web.Response(status=204)


async def key_usage(request: web.Request) -> web.Response:
    """A key's usage."""
    gateway = _require_admin(request)
    await gateway.usage.flush()
    (view,) = await _views(gateway, [await _key(gateway, request)])
    return _json(view.usage)


async def bot_usage(request: web.Request) -> web.Response:
    """A bot's usage, all its keys together."""
    gateway = _require_admin(request)
    bot = await _bot(gateway, request)
    await gateway.usage.flush()
    (counts,) = await gateway.registry.usage([gateway.registry.names.bot_usage(bot.id)])
    return _json(_usage_view(counts))


async def list_workers(request: web.Request) -> web.Response:
    """The live workers: each one's id, version, model endpoints, jobs in flight and
    capacity, from the heartbeats they renew every few seconds; a worker that stopped
    renewing (gone, or cut off from Redis) drops out within ``BOTLINE_HEARTBEAT_TTL_S``."""
    gateway = _require_admin(request)
    workers = await fleet.live_workers(gateway.redis, gateway.registry.names)
    return _json([w.model_dump(mode="json") for w in workers])


async def list_endpoints(request: web.Request) -> web.Response:
    """The model endpoints the workers know, each with its fleet-wide state."""
    gateway = _require_admin(request)
    redis, names = gateway.registry.redis, gateway.registry.names
    states = await endpoint_states(redis, names, await known_endpoints(redis, names))
    return _json([s.model_dump() for s in states])


@dataclass(frozen=True)
class Route:
    """One admin route: how it is served and how the OpenAPI document describes it."""

    method: str
    path: str
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    summary: str
    body: type[BaseModel] | None = None
    answer: type[BaseModel] | None = None
    many: bool = False
    status: int = 200


ROUTES = [
    Route("GET", "/bots", list_bots, "List bots", answer=Bot, many=True),
    Route("POST", "/bots", create_bot, "Create a bot", BotInput, Bot, status=201),
    Route("GET", "/bots/{bot_id}", show_bot, "Show a bot", answer=Bot),
    Route("PATCH", "/bots/{bot_id}", update_bot, "Update a bot", BotPatch, Bot),
    Route("DELETE", "/bots/{bot_id}", delete_bot, "Delete a bot", status=204),
    Route("GET", "/bots/{bot_id}/keys", list_keys, "List a bot's keys", answer=KeyView, many=True),
    Route("POST", "/bots/{bot_id}/keys", create_key, "Create a key", KeyInput, CreatedKey,
          status=201),
    Route("GET", "/bots/{bot_id}/usage", bot_usage, "A bot's usage", answer=UsageView),
    Route("GET", "/keys/{key_id}", show_key, "Show a key", answer=KeyView),
    Route("PATCH", "/keys/{key_id}", update_key, "Update a key", KeyPatch, KeyView),
    Route("POST", "/keys/{key_id}/disable", _set_disabled(True), "Disable a key", answer=KeyView),
    Route("POST", "/keys/{key_id}/enable", _set_disabled(False), "Enable a key", answer=KeyView),
    Route("DELETE", "/keys/{key_id}", revoke_key, "Revoke a key", status=204),
    Route("GET", "/keys/{key_id}/usage", key_usage, "A key's usage", answer=UsageView),
    Route("GET", "/workers", list_workers, "List live workers", answer=fleet.Heartbeat, many=True),
    Route("GET", "/endpoints", list_endpoints, "Model endpoints' state", answer=EndpointState,
          many=True),
]  # fmt: skip
