"""The worker's HTTP client for model endpoints carries nothing from one call to the next."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
import structlog.testing
from aiohttp import web

from services.worker.endpoints import OpenAIModel
from services.worker.settings import EndpointConfig
from shared.errors import UpstreamError
from tests.support.samples import JOB

ANSWER = {
    "choices": [{"message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1},
}


async def serve_chat(
    chat: Callable[[web.Request], Awaitable[web.Response]], host: str
) -> tuple[web.AppRunner, int]:
    """An endpoint answering ``/v1/chat/completions`` with ``chat``, and its port."""
    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, host, 0).start()
    return runner, runner.addresses[0][1]


async def test_cookies_an_endpoint_sets_are_not_sent_back() -> None:
    # One session serves every bot and key on the endpoint: a cookie it kept (a
    # provider's load-balancer or bot-management cookie) would go out with other
    # callers' requests.
    cookies: list[str | None] = []

    async def chat(request: web.Request) -> web.Response:
        cookies.append(request.headers.get("Cookie"))
        response = web.json_response(ANSWER)
        response.set_cookie("affinity", "caller-one", path="/")
        return response

    runner, port = await serve_chat(chat, "localhost")
    # A host name, not an address: aiohttp's default jar ignores cookies from addresses.
    model = OpenAIModel(EndpointConfig(kind="openai", base_url=f"http://localhost:{port}/v1"))
    job = JOB.model_copy(update={"endpoint": "fake", "stream": False})
    try:
        for _ in range(2):
            pieces = [piece async for piece in model.stream(job)]
            assert pieces[0] == "hi"
    finally:
        await model.close()
        await runner.cleanup()
    assert cookies == [None, None]


async def test_an_api_key_with_a_line_break_fails_each_call_and_is_never_sent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A key pasted with a line break inside would add a header of its own.
    monkeypatch.setenv("BAD_UPSTREAM_KEY", "sk-secret\r\nX-Injected: 1")
    with structlog.testing.capture_logs() as logs:
        model = OpenAIModel(
            EndpointConfig(
                kind="openai", base_url="http://127.0.0.1:9/v1", api_key_env="BAD_UPSTREAM_KEY"
            )
        )
    assert [entry["event"] for entry in logs] == ["endpoint.misconfigured"]
    assert logs[0]["api_key_env"] == "BAD_UPSTREAM_KEY"  # which setting to mend
    assert "sk-secret" not in repr(logs)
    job = JOB.model_copy(update={"endpoint": "fake", "stream": False})
    with pytest.raises(UpstreamError, match="misconfigured") as caught:
        [piece async for piece in model.stream(job)]
    assert not caught.value.retryable
    assert "sk-secret" not in str(caught.value)
    await model.close()


async def test_a_trailing_newline_on_an_api_key_is_not_sent() -> None:
    seen: list[str | None] = []

    async def chat(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization"))
        return web.json_response(ANSWER)

    runner, port = await serve_chat(chat, "127.0.0.1")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GOOD_UPSTREAM_KEY", "sk-fine\n")
        model = OpenAIModel(
            EndpointConfig(
                kind="openai",
                base_url=f"http://127.0.0.1:{port}/v1",
                api_key_env="GOOD_UPSTREAM_KEY",
            )
        )
    job = JOB.model_copy(update={"endpoint": "fake", "stream": False})
    try:
        pieces = [piece async for piece in model.stream(job)]
        assert pieces[0] == "hi"
    finally:
        await model.close()
        await runner.cleanup()
    assert seen == ["Bearer sk-fine"]
