"""The gateway's routes, as a plain table."""

from __future__ import annotations

from aiohttp import web

from services.gateway import health, seed


def setup_routes(app: web.Application) -> None:
    """Add every route to the app."""
    app.router.add_routes(
        [
            web.post("/v1/chat/completions", seed.chat_completions),
            web.get("/livez", health.livez),
            web.get("/readyz", health.readyz),
        ]
    )
