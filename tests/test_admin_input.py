"""Strict admin input (issue 10, item 7), and schemathesis against the OpenAPI document."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.core.failures import Failure, FailureGroup
from schemathesis.core.result import Ok

from tests.support.client import auth
from tests.support.stack import Stack

pytestmark = pytest.mark.integration

TOKEN = "input-admin-token-1"
# schemathesis's budget: examples per operation and mode, and the whole run's time.
EXAMPLES = 40
BUDGET_S = 45.0


@pytest.fixture
async def admin(bare_stack: Stack) -> Stack:
    await bare_stack.add_gateway(admin_tokens=[TOKEN])
    return bare_stack


async def call(stack: Stack, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    async with stack.http.request(
        method, f"{stack.url}/admin/api{path}", json=body, headers=auth(TOKEN)
    ) as resp:
        return resp.status, (await resp.json() if resp.status != 204 else None)


async def bot_and_key(stack: Stack) -> tuple[str, str]:
    status, bot = await call(stack, "POST", "/bots", {"name": "strict"})
    assert status == 201
    status, created = await call(stack, "POST", f"/bots/{bot['id']}/keys", {"name": "k"})
    assert status == 201
    return bot["id"], created["record"]["key_id"]


async def test_unknown_nested_fields_are_a_400_naming_them(admin: Stack) -> None:
    bot_id, key_id = await bot_and_key(admin)
    for method, path, body, param in [
        ("PATCH", f"/bots/{bot_id}", {"limits": {"rmp": 10}}, "limits.rmp"),
        ("POST", "/bots", {"name": "x", "limits": {"concurency": 1}}, "limits.concurency"),
        ("POST", f"/bots/{bot_id}/keys", {"limits": {"rpm": 1, "tmp": 5}}, "limits.tmp"),
        ("PATCH", f"/keys/{key_id}", {"limits": {"rmp": 10}}, "limits.rmp"),
    ]:
        status, error = await call(admin, method, path, body)
        assert (status, error["error"]["param"]) == (400, param), (method, path, body)
        assert param in error["error"]["message"]
    # Nothing changed.
    assert (await call(admin, "GET", f"/bots/{bot_id}"))[1]["limits"]["rpm"] is None


async def test_null_where_a_field_cannot_be_null_is_a_400(admin: Stack) -> None:
    bot_id, key_id = await bot_and_key(admin)
    for path, field in [
        (f"/bots/{bot_id}", "name"),
        (f"/bots/{bot_id}", "temperature"),
        (f"/bots/{bot_id}", "limits"),
        (f"/keys/{key_id}", "disabled"),
        (f"/keys/{key_id}", "name"),
        (f"/keys/{key_id}", "limits"),
    ]:
        status, error = await call(admin, "PATCH", path, {field: None})
        assert (status, error["error"]["param"]) == (400, field), (path, field)
    # Where null means something, it is still taken.
    status, key = await call(admin, "PATCH", f"/keys/{key_id}", {"expires_at": None})
    assert (status, key["expires_at"]) == (200, None)
    status, key = await call(admin, "PATCH", f"/keys/{key_id}", {"limits": {"rpm": None}})
    assert (status, key["limits"]["rpm"]) == (200, None)


async def test_booleans_and_strings_are_not_numbers(admin: Stack) -> None:
    bot_id, key_id = await bot_and_key(admin)
    for method, path, body, param in [
        ("POST", f"/bots/{bot_id}/keys", {"expires_at": False}, "expires_at"),
        ("PATCH", f"/keys/{key_id}", {"expires_at": True}, "expires_at"),
        ("PATCH", f"/keys/{key_id}", {"expires_at": "1999"}, "expires_at"),
        ("PATCH", f"/bots/{bot_id}", {"temperature": True}, "temperature"),
        ("PATCH", f"/bots/{bot_id}", {"max_reply_tokens": "5"}, "max_reply_tokens"),
        ("PATCH", f"/bots/{bot_id}", {"limits": {"rpm": True}}, "limits.rpm"),
        ("PATCH", f"/keys/{key_id}", {"disabled": 1}, "disabled"),
        ("PATCH", f"/keys/{key_id}", {"expires_at": 2**70}, "expires_at"),
    ]:
        status, error = await call(admin, method, path, body)
        assert (status, error["error"]["param"]) == (400, param), body
    status, key = await call(admin, "GET", f"/keys/{key_id}")
    assert (status, key["status"], key["expires_at"]) == (200, "active", None)


async def test_an_id_of_the_wrong_shape_is_a_404(admin: Stack) -> None:
    bot_id, key_id = await bot_and_key(admin)
    # "<bot>:keys" is the Redis set of the bot's keys: once a WRONGTYPE 500.
    for method, path in [
        ("GET", f"/bots/{bot_id}:keys"),
        ("PATCH", f"/bots/{bot_id}:keys"),
        ("GET", f"/bots/{bot_id}:keys/keys"),
        ("GET", f"/bots/{bot_id}:keys/usage"),
        ("DELETE", f"/bots/{bot_id}:keys"),
        ("GET", "/bots/*"),
        ("GET", f"/keys/{key_id}x"),
        ("POST", f"/keys/{key_id[:-1]}/disable"),
        ("DELETE", "/keys/%00"),
    ]:
        status, error = await call(
            admin, method, path, {"name": "n"} if method == "PATCH" else None
        )
        assert (status, error["error"]["code"]) == (404, "not_found"), (method, path)
    assert (await call(admin, "GET", f"/bots/{bot_id}/keys"))[0] == 200


CHECKS: list[Any] = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


def fuzz_operation(
    operation: Any, mode: GenerationMode, url: str, ids: dict[str, str], deadline: float
) -> tuple[int, list[str]]:
    """schemathesis's cases for one operation and mode; the calls made and the failures."""
    headers = auth(TOKEN)
    checks = CHECKS + ([negative_data_rejection] if mode is GenerationMode.NEGATIVE else [])
    # Real ids, so bodies reach real records; DELETE keeps made-up ones.
    real = None
    if operation.method.upper() != "DELETE":
        real = {p.name: ids[p.name] for p in operation.path_parameters}
    failures: list[str] = []
    calls = 0

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(mode, path_parameters=real))
    def run(case: Any) -> None:
        nonlocal calls
        if time.monotonic() > deadline:
            return
        response = case.call(base_url=url, headers=headers)
        calls += 1
        try:
            case.validate_response(response, checks=checks, headers=headers)
        except (Failure, FailureGroup) as exc:
            for failure in exc.exceptions if isinstance(exc, FailureGroup) else [exc]:
                where = f"{case.method} {case.formatted_path} {case.body!r}"[:400]
                failures.append(
                    f"{operation.label} [{mode.value}]: {failure}"[:800] + " <- " + where
                )

    run()
    return calls, failures


def fuzz(url: str, bot_id: str, key_id: str) -> tuple[int, list[str]]:
    """schemathesis over every admin operation, positive and negative; calls and failures."""
    schema = schemathesis.openapi.from_url(f"{url}/admin/api/openapi.json")
    ids = {"bot_id": bot_id, "key_id": key_id}
    deadline = time.monotonic() + BUDGET_S
    calls, failures = 0, []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            made, failed = fuzz_operation(result.ok(), mode, url, ids, deadline)
            calls += made
            failures += failed
    return calls, failures


async def test_schemathesis_finds_no_server_error_and_no_schema_violation(admin: Stack) -> None:
    bot_id, key_id = await bot_and_key(admin)
    started = time.monotonic()
    calls, failures = await asyncio.to_thread(fuzz, admin.url, bot_id, key_id)
    took = time.monotonic() - started
    assert calls >= 100, f"only {calls} calls in {took:.1f} s"
    assert not failures, "\n\n".join(sorted(set(failures))[:10])
    print(f"schemathesis: {calls} calls in {took:.1f} s")
    assert took < 60
