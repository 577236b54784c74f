"""Content a bot did not ask for: non-text parts pass only where the bot allows them."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from redis.asyncio import Redis

from tests.support.client import auth
from tests.support.stack import Stack, run_cli

pytestmark = pytest.mark.integration

TOKEN = "admin-secret-token-1"
OPENAI = "/openai/v1/chat/completions"
TEXT = {"type": "text", "text": "what is this?"}
# A self-hosted model server that fetches image URLs would fetch this one.
IMAGE = {"type": "image_url", "image_url": {"url": "http://169.254.169.254/latest/meta-data"}}


def asking(*parts: dict[str, Any]) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": list(parts)}]}


async def admin(stack: Stack, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    async with stack.http.request(
        method, f"{stack.url}/admin/api{path}", json=body, headers=auth(TOKEN)
    ) as resp:
        return resp.status, await resp.json()


async def test_images_reach_the_model_only_for_bots_that_allow_them(bare_stack: Stack) -> None:
    stack = bare_stack
    await stack.add_worker()
    await stack.add_gateway(admin_tokens=[TOKEN])
    up = stack.upstream
    status, text_bot = await admin(stack, "POST", "/bots", {"name": "t", "endpoint": "fake"})
    assert (status, text_bot["allowed_content"]) == (201, [])
    _, created = await admin(stack, "POST", f"/bots/{text_bot['id']}/keys", {"name": "k"})
    status, body, _ = await stack.chat(created["key"], asking(TEXT, IMAGE), path=OPENAI)
    assert status == 400
    assert body["error"]["param"] == "messages[0].content[1].type"
    assert up.requests == []

    # The same bot, once it allows images, forwards them as they came.
    status, bot = await admin(
        stack, "PATCH", f"/bots/{text_bot['id']}", {"allowed_content": ["image"]}
    )
    assert (status, bot["allowed_content"]) == (200, ["image"])
    status, _, _ = await stack.chat(created["key"], asking(TEXT, IMAGE), path=OPENAI)
    assert status == 200
    assert up.requests[-1].body["messages"] == [{"role": "user", "content": [TEXT, IMAGE]}]

    status, error = await admin(stack, "POST", "/bots", {"name": "v", "allowed_content": ["video"]})
    assert (status, error["error"]["param"]) == (400, "allowed_content[0]")
    async with stack.http.get(f"{stack.url}/admin/api/openapi.json") as resp:
        document = await resp.json()
    schemas = document["components"]["schemas"]
    assert schemas["BotInput"]["properties"]["allowed_content"]["items"]["enum"] == [
        "image", "audio", "file"
    ]  # fmt: skip


async def test_caller_system_messages_follow_the_bots_own(stack: Stack) -> None:
    _, key = await stack.bot_and_key(endpoint="fake", model="m", system_prompt="Bot rules.")
    body = {
        "messages": [
            {"role": "system", "content": "Caller rules.", "x_trace": "t-1"},
            {"role": "user", "content": "hi", "metadata": {"a": 1}},
        ]
    }
    for path in ("/v1/chat/completions", OPENAI):
        assert (await stack.chat(key, body, path=path))[0] == 200
        assert stack.upstream.requests[-1].body["messages"] == [
            {"role": "system", "content": "Bot rules."},
            {"role": "system", "content": "Caller rules."},
            {"role": "user", "content": "hi"},
        ]


async def test_cli_creates_bots_that_allow_content(namespace: str, redis: Redis) -> None:
    # (``redis`` removes the namespace's bots afterwards)
    out, _ = await run_cli(namespace, "bots", "create", "--name", "eyes",
                           "--allow-content", "image", "--allow-content", "file")  # fmt: skip
    assert orjson.loads(out)["allowed_content"] == ["image", "file"]
    out, _ = await run_cli(namespace, "bots", "create", "--name", "plain")
    assert orjson.loads(out)["allowed_content"] == []
