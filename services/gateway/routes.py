"""The gateway's routes, as a plain table."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from services.gateway import admin, health, openai_api, openapi, seed_api

STATIC = Path(__file__).parent / "static" / "admin"


async def admin_page(request: web.Request) -> web.FileResponse:
    """The admin web page (one HTML file; it signs in with an admin token)."""
    return web.FileResponse(STATIC / "index.html")


async def admin_redirect(request: web.Request) -> web.Response:
    """``/admin`` -> ``/admin/``."""
    raise web.HTTPPermanentRedirect("/admin/")


def setup_routes(app: web.Application) -> None:
    """Add every route to the app."""
    app.router.add_routes(
        [
            web.post("/v1/chat/completions", seed_api.chat_completions),
            web.post("/openai/v1/chat/completions", openai_api.chat_completions),
            web.get("/openai/v1/models", openai_api.list_models),
            web.get("/openai/v1/models/{model_id}", openai_api.get_model),
            web.get("/livez", health.livez),
            web.get("/readyz", health.readyz),
            web.get("/metrics", health.metrics),
            web.get("/admin", admin_redirect),
            web.get("/admin/", admin_page),
            web.static("/admin/static", STATIC),
            web.get(openapi.ADMIN_PREFIX + "/openapi.json", openapi.serve_document),
        ]
    )
    for route in admin.ROUTES:
        app.router.add_route(route.method, openapi.ADMIN_PREFIX + route.path, route.handler)
