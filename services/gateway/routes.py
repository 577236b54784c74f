"""The gateway's routes, as a plain table."""

from __future__ import annotations

from aiohttp import web

from services.gateway import health, openai_api, seed


def setup_routes(app: web.Application) -> None:
    """Add every route to the app."""
    app.router.add_routes(
        [
            web.post("/v1/chat/completions", seed.chat_completions),
            web.post("/openai/v1/chat/completions", openai_api.chat_completions),
            web.get("/openai/v1/models", openai_api.list_models),
            web.get("/openai/v1/models/{model_id}", openai_api.get_model),
            web.get("/livez", health.livez),
            web.get("/readyz", health.readyz),
        ]
    )
