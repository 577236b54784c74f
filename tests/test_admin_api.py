"""The admin API: every operation, with and without a token."""

from __future__ import annotations

from typing import Any

import pytest
from openapi_spec_validator import validate

from services.gateway.admin import ROUTES
from shared.clock import now_ms
from tests.support.client import auth, chat
from tests.support.stack import Stack

pytestmark = pytest.mark.integration

TOKEN = "admin-secret-token-1"
HELLO = {"messages": [{"role": "user", "content": "hello admin"}]}


@pytest.fixture
async def admin(bare_stack: Stack) -> Stack:
    await bare_stack.add_worker()
    await bare_stack.add_gateway(admin_tokens=[TOKEN, "second-token-0123456789"])
    return bare_stack


async def call(
    stack: Stack, method: str, path: str, body: Any = None, token: str | None = TOKEN
) -> tuple[int, Any]:
    headers = auth(token) if token else {}
    async with stack.http.request(
        method, f"{stack.url}/admin/api{path}", json=body, headers=headers
    ) as resp:
        data = await resp.json() if resp.status != 204 else None
        return resp.status, data


def concrete(path: str) -> str:
    return path.replace("{bot_id}", "bot_x").replace("{key_id}", "key_x")


async def test_every_operation_needs_a_valid_token(admin: Stack) -> None:
    for route in ROUTES:
        for token in (None, "wrong", TOKEN + "x"):
            status, body = await call(admin, route.method, concrete(route.path), {}, token)
            assert status == 401, (route.method, route.path, token)
            assert body["error"]["code"] == "invalid_admin_token"
    # Any configured token works.
    assert (await call(admin, "GET", "/bots", token="second-token-0123456789"))[0] == 200


async def test_without_tokens_the_admin_api_is_off(bare_stack: Stack) -> None:
    await bare_stack.add_gateway()
    for route in ROUTES:
        status, body = await call(bare_stack, route.method, concrete(route.path), {}, "anything")
        assert status == 401
        assert "off" in body["error"]["message"]


async def test_bots_crud(admin: Stack) -> None:
    status, bot = await call(admin, "POST", "/bots", {"name": "helper", "system_prompt": "Hi."})
    assert status == 201
    assert (bot["name"], bot["endpoint"], bot["temperature"]) == ("helper", "echo", 0.7)
    assert bot["limits"] == {"rpm": None, "tpm": None, "concurrency": None}
    bot_id = bot["id"]
    status, bots = await call(admin, "GET", "/bots")
    assert [b["id"] for b in bots] == [bot_id]
    assert (await call(admin, "GET", f"/bots/{bot_id}"))[1]["system_prompt"] == "Hi."
    status, updated = await call(
        admin, "PATCH", f"/bots/{bot_id}", {"temperature": 0.2, "limits": {"rpm": 5}}
    )
    assert status == 200
    assert updated["temperature"] == 0.2
    assert updated["limits"]["rpm"] == 5
    assert updated["name"] == "helper"
    # Bad input: a clear 400 naming the field; nothing changed.
    status, error = await call(admin, "PATCH", f"/bots/{bot_id}", {"temperature": 7})
    assert (status, error["error"]["param"]) == (400, "temperature")
    status, error = await call(admin, "POST", "/bots", {"name": "x", "colour": "red"})
    assert (status, error["error"]["param"]) == (400, "colour")
    status, error = await call(admin, "POST", "/bots", {"endpoint": "echo"})
    assert (status, error["error"]["param"]) == (400, "name")
    assert (await call(admin, "GET", f"/bots/{bot_id}"))[1]["temperature"] == 0.2
    assert (await call(admin, "DELETE", f"/bots/{bot_id}"))[0] == 204
    assert (await call(admin, "GET", f"/bots/{bot_id}"))[0] == 404
    assert (await call(admin, "DELETE", f"/bots/{bot_id}"))[0] == 404
    assert (await call(admin, "PATCH", "/bots/bot_nope", {"name": "x"}))[0] == 404


async def test_keys_lifecycle_and_usage(admin: Stack) -> None:
    _, bot = await call(admin, "POST", "/bots", {"name": "k"})
    bot_id = bot["id"]
    expires = now_ms() + 86_400_000
    status, created = await call(
        admin,
        "POST",
        f"/bots/{bot_id}/keys",
        {"name": "partner", "expires_at": expires, "limits": {"rpm": 100}},
    )
    assert status == 201
    key, record = created["key"], created["record"]
    key_id = record["key_id"]
    assert key.startswith("bl-")
    assert record["prefix"] == key[:9]
    assert (record["name"], record["expires_at"], record["status"]) == (
        "partner",
        expires,
        "active",
    )
    assert record["limits"]["rpm"] == 100
    assert record["usage"] == {
        "requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0,
    }  # fmt: skip

    status, body, _ = await chat(admin.http, admin.url, key, HELLO)
    assert status == 200
    answered = body["usage"]

    status, keys = await call(admin, "GET", f"/bots/{bot_id}/keys")
    assert status == 200
    assert [k["key_id"] for k in keys] == [key_id]
    assert key not in str(keys)  # the secret is never shown again
    assert keys[0]["usage"]["requests"] == 1
    assert keys[0]["usage"]["total_tokens"] == answered["totalTokens"]
    assert keys[0]["last_used_at"] is not None
    status, one = await call(admin, "GET", f"/keys/{key_id}")
    assert one["usage"]["prompt_tokens"] == answered["promptTokens"]
    assert (await call(admin, "GET", f"/keys/{key_id}/usage"))[1]["requests"] == 1
    assert (await call(admin, "GET", f"/bots/{bot_id}/usage"))[1]["completion_tokens"] == (
        answered["completionTokens"]
    )

    status, patched = await call(
        admin,
        "PATCH",
        f"/keys/{key_id}",
        {"name": "renamed", "expires_at": None, "limits": {"concurrency": 2}},
    )
    assert status == 200
    assert (patched["name"], patched["expires_at"]) == ("renamed", None)
    assert patched["limits"] == {"rpm": None, "tpm": None, "concurrency": 2}
    status, error = await call(admin, "PATCH", f"/keys/{key_id}", {"limits": {"rpm": 0}})
    assert (status, error["error"]["param"]) == (400, "limits.rpm")

    status, disabled = await call(admin, "POST", f"/keys/{key_id}/disable")
    assert (status, disabled["status"], disabled["disabled"]) == (200, "disabled", True)
    status, body, _ = await chat(admin.http, admin.url, key, HELLO)
    assert (status, body["error"]["code"]) == (401, "api_key_disabled")
    status, enabled = await call(admin, "POST", f"/keys/{key_id}/enable")
    assert enabled["status"] == "active"
    assert (await chat(admin.http, admin.url, key, HELLO))[0] == 200

    past = now_ms() - 1000
    assert (await call(admin, "PATCH", f"/keys/{key_id}", {"expires_at": past}))[1][
        "status"
    ] == "expired"
    status, body, _ = await chat(admin.http, admin.url, key, HELLO)
    assert (status, body["error"]["code"]) == (401, "api_key_expired")

    assert (await call(admin, "DELETE", f"/keys/{key_id}"))[0] == 204
    assert (await call(admin, "GET", f"/keys/{key_id}"))[0] == 404
    assert (await call(admin, "DELETE", f"/keys/{key_id}"))[0] == 404
    assert (await call(admin, "POST", f"/keys/{key_id}/enable"))[0] == 404
    status, body, _ = await chat(admin.http, admin.url, key, HELLO)
    assert (status, body["error"]["code"]) == (401, "invalid_api_key")
    assert (await call(admin, "POST", "/bots/bot_nope/keys", {}))[0] == 404


async def test_openapi_document_describes_every_route(admin: Stack) -> None:
    async with admin.http.get(f"{admin.url}/admin/api/openapi.json") as resp:
        assert resp.status == 200
        document = await resp.json()
    validate(document)
    for route in ROUTES:
        assert route.method.lower() in document["paths"]["/admin/api" + route.path]


async def test_admin_page_is_served(admin: Stack) -> None:
    async with admin.http.get(f"{admin.url}/admin", allow_redirects=False) as resp:
        assert resp.status == 308
    async with admin.http.get(f"{admin.url}/admin/") as resp:
        assert resp.status == 200
        page = await resp.text()
    assert "<title>botline admin</title>" in page
    for asset in ("admin.js", "admin.css"):
        async with admin.http.get(f"{admin.url}/admin/static/{asset}") as resp:
            assert resp.status == 200
