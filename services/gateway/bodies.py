"""Request bodies: read within the size limit, parse as a JSON object, name a bad field.

Every surface and the admin API read bodies the same way, so a caller gets
the same 413 and the same ``param`` naming whichever endpoint it called;
a validation error names the field and never echoes its content.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web
from pydantic import ValidationError

from services.gateway.resources import GATEWAY
from shared.errors import InvalidRequest, RequestTooLarge


async def read_body(request: web.Request) -> bytes:
    """The request body, within the size limit."""
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        limit = request.config_dict[GATEWAY].settings.max_body_bytes
        raise RequestTooLarge(f"the body is larger than {limit} bytes") from None


def field_name(loc: tuple[int | str, ...]) -> str:
    """``("messages", 0, "role")`` -> ``messages[0].role``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


def load_object(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object, or a 400."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidRequest("the body is not valid JSON") from None
    if not isinstance(data, dict):
        raise InvalidRequest("the body must be a JSON object")
    return data


def invalid(exc: ValidationError) -> InvalidRequest:
    """The first validation error, naming the field and never echoing its content."""
    first = exc.errors(include_input=False, include_url=False)[0]
    name = field_name(tuple(first["loc"]))
    return InvalidRequest(f"{name}: {first['msg']}", param=name)
