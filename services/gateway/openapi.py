"""The admin API's OpenAPI document, made from its route table and pydantic models."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from pydantic import BaseModel

from services.gateway.admin import ROUTES, Route
from services.gateway.admin_input import BOT_ID, KEY_ID

ADMIN_PREFIX = "/admin/api"
_ID_SCHEMAS = {
    "bot_id": {"type": "string", "pattern": BOT_ID},
    "key_id": {"type": "string", "pattern": KEY_ID},
}


def _ref(model: type[BaseModel], schemas: dict[str, Any]) -> dict[str, Any]:
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    for name, sub in schema.pop("$defs", {}).items():
        schemas[name] = sub
    schemas[model.__name__] = schema
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _operation(route: Route, schemas: dict[str, Any]) -> dict[str, Any]:
    error = {"$ref": "#/components/responses/Error"}
    operation: dict[str, Any] = {
        "summary": route.summary,
        "description": (route.handler.__doc__ or "").strip(),
        "operationId": route.handler.__name__,
        # Every error a caller can get: 400 bad input, 401 no admin token, 404 no such
        # record (or an id of the wrong shape), 503 Redis unreachable.
        "responses": {"400": error, "401": error, "404": error, "503": error},
    }
    params = [p.strip("{}") for p in route.path.split("/") if p.startswith("{")]
    if params:
        operation["parameters"] = [
            {"name": p, "in": "path", "required": True, "schema": _ID_SCHEMAS[p]} for p in params
        ]
    if route.body is not None:
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": _ref(route.body, schemas)}},
        }
        operation["responses"]["413"] = error  # over BOTLINE_MAX_BODY_BYTES
    ok: dict[str, Any] = {"description": "OK"}
    if route.answer is not None:
        schema = _ref(route.answer, schemas)
        if route.many:
            schema = {"type": "array", "items": schema}
        ok["content"] = {"application/json": {"schema": schema}}
    operation["responses"][str(route.status)] = ok
    return operation


def document() -> dict[str, Any]:
    """The OpenAPI 3.1 document of the admin API."""
    schemas: dict[str, Any] = {}
    paths: dict[str, Any] = {}
    for route in ROUTES:
        paths.setdefault(ADMIN_PREFIX + route.path, {})[route.method.lower()] = _operation(
            route, schemas
        )
    schemas["Error"] = {
        "type": "object",
        "properties": {
            "error": {
                "type": "object",
                "properties": {
                    k: {"type": ["string", "null"]} for k in ("message", "type", "param", "code")
                },
            }
        },
    }  # fmt: skip
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "botline admin API",
            "version": "1",
            "description": "Bots, API keys, limits and usage. Send an admin token as "
            "`Authorization: Bearer <token>`.",
        },
        "components": {
            "securitySchemes": {"adminToken": {"type": "http", "scheme": "bearer"}},
            "schemas": schemas,
            "responses": {
                "Error": {
                    "description": "An error",
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}
                    },
                }
            },
        },
        "security": [{"adminToken": []}],
        "paths": paths,
    }  # fmt: skip


async def serve_document(request: web.Request) -> web.Response:
    """``GET /admin/api/openapi.json`` (public: it describes, it holds nothing)."""
    return web.json_response(document())
