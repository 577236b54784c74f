"""The worker's HTTP client for model endpoints carries nothing from one call to the next."""

from __future__ import annotations

from aiohttp import web

from services.worker.endpoints import OpenAIModel
from services.worker.settings import EndpointConfig
from tests.support.samples import JOB

ANSWER = {
    "choices": [{"message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1},
}


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

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "localhost", 0)
    await site.start()
    port = runner.addresses[0][1]
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
