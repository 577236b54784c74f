"""Request bodies: read within the size limit, parse as a JSON object, name a bad field.

Every surface and the admin API read bodies the same way, so a caller gets
the same 413 and the same ``param`` naming whichever endpoint it called;
a validation error names the field and never echoes its content.
"""

from __future__ import annotations

import itertools
from typing import Any

import orjson
from aiohttp import web
from pydantic import ValidationError

from services.gateway.resources import gateway_of
from shared.errors import InvalidRequest, RequestTooLarge

# Documented in the README. Generous for any real request, including tools'
# JSON Schemas; far below the depths that exhaust a parser or a serializer
# (orjson refuses to write past 254, so a deeper job would fail in the worker).
MAX_JSON_DEPTH = 64
MAX_MESSAGES = 2048
MAX_CONTENT_PARTS = 256
# Parsing allocates an object per array and object: this bounds its cost.
MAX_JSON_CONTAINERS = 20_000

_SQUARE = bytes.maketrans(b"{}", b"[]")
_NOT_MARK = bytes(sorted(set(range(256)) - set(b'[]{}"')))
# Opening brackets to +1, closing ones to -1 (as signed bytes).
_SIGN = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")


def json_shape_error(raw: bytes) -> str | None:
    """Why the JSON text ``raw`` is too deep or has too many arrays and objects, or None.

    Checked on the bytes before any parser recurses or allocates, in a few
    passes done in C: drop escaped backslashes and quotes; keep only quotes and
    brackets; drop adjacent quote pairs (a string without brackets in it, or
    the gap between two strings: which brackets sit inside a string is kept);
    cut out what is left of strings (every other piece between quotes);
    remove the innermost bracket pairs once (a body of many small objects
    shrinks to almost nothing); then take the highest running sum of +1 per
    opening and -1 per closing bracket. Text that is not valid JSON may be
    misjudged; the parser refuses it anyway.
    """
    if raw.count(b"[") + raw.count(b"{") <= MAX_JSON_DEPTH:
        return None  # the common case: nothing to count
    if b"\\" in raw:
        raw = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    marks = raw.translate(None, _NOT_MARK).replace(b'""', b"")
    brackets = b"".join(marks.split(b'"')[::2]) if b'"' in marks else marks
    if len(brackets) > 2 * MAX_JSON_CONTAINERS:
        return f"the body holds more than {MAX_JSON_CONTAINERS} arrays and objects"
    shape = brackets.translate(_SQUARE).replace(b"[]", b"")
    if not shape:
        return None
    signs = memoryview(shape.translate(_SIGN)).cast("b")
    # The pairs removed above were one level: what is left is one shallower.
    if max(itertools.accumulate(signs)) > MAX_JSON_DEPTH - 1:
        return f"the body nests deeper than {MAX_JSON_DEPTH} levels"
    return None


async def read_body(request: web.Request) -> bytes:
    """The request body, within the size limit."""
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        limit = gateway_of(request).settings.max_body_bytes
        raise RequestTooLarge(f"the body is larger than {limit} bytes") from None


def field_name(loc: tuple[int | str, ...]) -> str:
    """``("messages", 0, "role")`` -> ``messages[0].role``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


def load_object(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object, or a 400."""
    shape_error = json_shape_error(raw)
    if shape_error is not None:
        raise InvalidRequest(shape_error)
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidRequest("the body is not valid JSON") from None
    if not isinstance(data, dict):
        raise InvalidRequest("the body must be a JSON object")
    return data


def trim_messages(data: dict[str, Any], keep: int) -> int:
    """Cap ``data["messages"]`` and keep only its last ``keep`` items, before validation.

    The job carries only the bot's last ``max_history_messages``: validating
    the rest would be work for nothing. Returns how many were cut, so that an
    error still names a message by its index in the body.
    """
    messages = data.get("messages")
    if not isinstance(messages, list):
        return 0  # validation names it
    if len(messages) > MAX_MESSAGES:
        raise InvalidRequest(f"messages: at most {MAX_MESSAGES} messages", param="messages")
    cut = max(len(messages) - keep, 0)
    if cut:
        data["messages"] = messages[cut:]
    return cut


def invalid(exc: ValidationError, cut: int = 0) -> InvalidRequest:
    """The first validation error, naming the field and never echoing its content.

    ``cut``: how many messages :func:`trim_messages` removed from the front.
    """
    first = exc.errors(include_input=False, include_url=False)[0]
    loc = tuple(first["loc"])
    if cut and len(loc) > 1 and loc[0] == "messages" and isinstance(loc[1], int):
        loc = ("messages", loc[1] + cut, *loc[2:])
    name = field_name(loc)
    return InvalidRequest(f"{name}: {first['msg']}", param=name)
