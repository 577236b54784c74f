"""Admin tokens (issue 10, item 1): no blank token, no short token, no header no entry."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import pytest
from pydantic import ValidationError

from services.gateway.admin import ROUTES
from services.gateway.settings import GatewaySettings
from tests.support.client import raw_request
from tests.support.stack import ROOT, Stack, free_port, process_env

REAL = "real-token-0123456789"


def tokens_of(raw: Any) -> list[str]:
    settings = GatewaySettings(admin_tokens=raw)
    return [t.get_secret_value() for t in settings.admin_tokens]


def test_blank_tokens_are_dropped_in_both_forms() -> None:
    assert tokens_of(f'["", "  {REAL}  ", " "]') == [REAL]
    assert tokens_of(f" , {REAL} ,,") == [REAL]
    assert tokens_of('[""]') == []
    assert tokens_of("") == []
    assert tokens_of(["", REAL]) == [REAL]


@pytest.mark.parametrize("raw", ['["short-token"]', "short-token", f'["{REAL}", "x"]'])
def test_a_short_token_is_refused(raw: str) -> None:
    with pytest.raises(ValidationError) as caught:
        GatewaySettings(admin_tokens=raw)
    assert "BOTLINE_ADMIN_TOKENS" in str(caught.value)
    assert "at least 16" in str(caught.value)


@pytest.mark.integration
async def test_a_blank_token_in_the_json_list_opens_nothing(bare_stack: Stack) -> None:
    # What '["${TOKEN}", ...]' gives when TOKEN is unset.
    url = await bare_stack.add_gateway(admin_tokens=f'["", "{REAL}"]')
    http = bare_stack.http
    for route in ROUTES:
        path = route.path.replace("{bot_id}", "bot_x").replace("{key_id}", "key_x")
        for headers in ({}, {"Authorization": "Bearer "}, {"Authorization": "Bearer"}):
            async with http.request(route.method, f"{url}/admin/api{path}", json={},
                                    headers=headers) as resp:  # fmt: skip
                assert resp.status == 401, (route.method, path, headers)
                assert (await resp.json())["error"]["code"] == "invalid_admin_token"
    async with http.get(f"{url}/admin/api/bots", headers={"Authorization": f"Bearer {REAL}"}) as r:
        assert r.status == 200


@pytest.mark.integration
async def test_a_non_ascii_admin_bearer_is_a_401(bare_stack: Stack) -> None:
    url = await bare_stack.add_gateway(admin_tokens=[REAL])
    for bearer in ("tökén-0123456789abc".encode(), b"t\xf6k\xe9n-0123456789abc", b"\xff\xfe"):
        answer = await raw_request(
            url,
            b"GET /admin/api/bots HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Authorization: Bearer " + bearer + b"\r\n\r\n",
        )
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 401"), head
        assert b'"invalid_admin_token"' in body
        assert b"Traceback" not in body


@pytest.mark.integration
async def test_the_gateway_refuses_to_start_with_a_short_token(namespace: str) -> None:
    secret = "tiny-secret-42"
    env = process_env(namespace, None, BOTLINE_ADMIN_TOKENS=f'["{REAL}", "{secret}"]',
                      BOTLINE_PORT=str(free_port()))  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli", "gateway", env=env, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        async with asyncio.timeout(20):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        pytest.fail("the gateway started with a 14-character admin token")
    assert proc.returncode != 0
    message = err.decode()
    assert "BOTLINE_ADMIN_TOKENS" in message
    assert "at least 16" in message
    assert secret not in message + out.decode()
    assert REAL not in message + out.decode()
    assert "Traceback" not in message
