"""The seed's flow in a real browser: sign in, open a bot, "+", confirm, use the key, revoke it."""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, Dialog, Route, async_playwright, expect

from services.worker.settings import EndpointConfig
from shared import keys
from tests.support import stack as stack_support
from tests.support.client import chat
from tests.support.fake_openai import Script
from tests.support.stack import Stack

pytestmark = pytest.mark.integration

CHROMIUM = os.environ.get("BOTLINE_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FOUND = Path(CHROMIUM).exists()
# As root, offline: no sandbox, and no background traffic to a network that isn't there.
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TOKEN = "browser-admin-token"
HELLO = {"messages": [{"role": "user", "content": "hello from a browser key"}]}


@pytest.fixture
async def browser(tmp_path: Path) -> AsyncIterator[Browser]:
    assert CHROMIUM_FOUND, "browser tests need Debian's chromium (make test installs it)"
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            yield browser
        finally:
            await browser.close()


async def test_the_seed_flow_in_a_browser(
    bare_stack: Stack, browser: Browser, tmp_path: Path
) -> None:
    await bare_stack.add_worker()
    url = await bare_stack.add_gateway(admin_tokens=[TOKEN])
    await bare_stack.registry.create_bot(name="Support bot", endpoint="echo", model="m")
    context = await browser.new_context(permissions=["clipboard-read", "clipboard-write"])
    page = await context.new_page()

    await page.goto(f"{url}/admin/")
    await page.get_by_label("Admin token").fill("wrong")
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.locator("#sign-in-error")).to_contain_text("admin token")
    await page.get_by_label("Admin token").fill(TOKEN)
    await page.get_by_role("button", name="Sign in").click()

    await page.get_by_role("link", name="Support bot").click()
    await expect(page.locator("#bot-title")).to_have_text("Support bot")
    await expect(page.locator("#no-keys")).to_be_visible()

    await page.get_by_role("button", name="Create an API key").click()
    await expect(page.locator("#confirm-dialog")).to_be_visible()
    await page.locator("#confirm-dialog").get_by_label("Name (optional)").fill("partner")
    await page.get_by_role("button", name="Create key").click()
    await expect(page.locator("#key-dialog")).to_be_visible()
    await expect(page.locator("#key-dialog")).to_contain_text("will not be shown again")
    key = (await page.locator("#new-key").text_content() or "").strip()
    assert keys.is_well_formed(key)
    await page.get_by_role("button", name="Copy").click()
    assert await page.evaluate("navigator.clipboard.readText()") == key
    # The list shows the new key at once, without its secret.
    rows = page.locator("#key-rows tr")
    await expect(rows).to_have_count(1)
    await expect(rows.first).to_contain_text(key[:9])
    await expect(rows.first).to_contain_text("active")
    await page.screenshot(path=str(tmp_path / "key-created.png"))
    await page.get_by_role("button", name="Done").click()
    await expect(page.locator("#key-dialog")).to_be_hidden()
    # The dialog's close event (which wipes the key) runs after it is hidden.
    await expect(page.locator("#new-key")).to_have_text("")
    assert key not in await page.content()

    status, body, _ = await chat(bare_stack.http, url, key, HELLO)
    assert status == 200
    assert body["choices"]["message"]["content"] == "hello from a browser key"
    await page.reload()
    await expect(rows.first.locator("td.num").first).to_have_text("1")  # requests
    await page.screenshot(path=str(tmp_path / "keys-list.png"), full_page=True)

    async def accept(dialog: Dialog) -> None:
        await dialog.accept()

    page.on("dialog", accept)
    await rows.first.get_by_role("button", name="Revoke").click()
    await expect(rows).to_have_count(0)
    status, body, _ = await chat(bare_stack.http, url, key, HELLO)
    assert (status, body["error"]["code"]) == (401, "invalid_api_key")
    await context.close()


async def slow_workers_list(route: Route) -> None:
    """The list of live workers answers late, as it may on a busy fleet."""
    await asyncio.sleep(1.5)
    await route.continue_()


async def test_a_bot_can_be_made_and_set_in_the_page(bare_stack: Stack, browser: Browser) -> None:
    url = await bare_stack.add_gateway(admin_tokens=[TOKEN])
    page = await browser.new_page()
    # The page's buttons work while its lists are still loading.
    await page.route("**/admin/api/workers", slow_workers_list)
    await page.goto(f"{url}/admin/")
    await page.get_by_label("Admin token").fill(TOKEN)
    await page.get_by_role("button", name="Sign in").click()
    await page.get_by_role("button", name="New bot").click()
    await page.locator("#bot-dialog").get_by_label("Name").fill("Fresh bot")
    await page.get_by_role("button", name="Create", exact=True).click()
    await expect(page.locator("#bot-title")).to_have_text("Fresh bot")
    await page.get_by_label("Temperature").fill("0.3")
    await page.get_by_label("Requests / min").fill("60")
    await page.get_by_role("button", name="Save settings").click()
    await expect(page.locator("#settings-saved")).to_be_visible()
    bot_id = re.sub(r".*#/bots/", "", page.url)
    saved = await bare_stack.registry.get_bot(bot_id)
    assert saved is not None
    assert (saved.temperature, saved.limits.rpm) == (0.3, 60)


async def test_the_page_lists_workers_and_warns_of_an_endpoint_none_serves(
    bare_stack: Stack, browser: Browser
) -> None:
    worker = await bare_stack.add_worker()
    url = await bare_stack.add_gateway(admin_tokens=[TOKEN])
    bot = await bare_stack.registry.create_bot(name="Typo bot", endpoint="ecoh", model="m")
    page = await browser.new_page()
    await page.goto(f"{url}/admin/")
    await page.get_by_label("Admin token").fill(TOKEN)
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.get_by_role("link", name="Typo bot")).to_be_visible()

    await page.get_by_role("link", name="Workers").click()
    rows = page.locator("#worker-rows tr")
    await expect(rows).to_have_count(1)
    await expect(rows.first).to_contain_text(worker.worker_id)
    await expect(rows.first).to_contain_text("echo, echo-slow, fake")

    await page.goto(f"{url}/admin/#/bots/{bot.id}")
    await expect(page.locator("#bot-title")).to_have_text("Typo bot")
    warning = page.locator("#endpoint-warning")
    await expect(warning).to_be_visible()
    await expect(warning).to_contain_text('No live worker serves the endpoint "ecoh"')
    # The live endpoints are offered as choices.
    options = page.locator("#endpoint-options option")
    await expect(options).to_have_count(3)
    assert await options.evaluate_all("os => os.map(o => o.value)") == [
        "echo",
        "echo-slow",
        "fake",
    ]
    await page.get_by_label("Model endpoint").fill("echo")
    await expect(warning).to_be_hidden()
    await page.get_by_role("button", name="Save settings").click()
    await expect(page.locator("#settings-saved")).to_be_visible()
    saved = await bare_stack.registry.get_bot(bot.id)
    assert saved is not None
    assert saved.endpoint == "echo"


async def test_the_page_shows_each_endpoints_state(bare_stack: Stack, browser: Browser) -> None:
    endpoints = stack_support.test_endpoints(bare_stack.upstream_url) | {
        "flaky": EndpointConfig(
            kind="openai", base_url=bare_stack.upstream_url, cooldown_failures=1, cooldown_s=60
        ),
    }
    await bare_stack.add_worker(endpoints=endpoints)
    url = await bare_stack.add_gateway(admin_tokens=[TOKEN])
    _, key = await bare_stack.bot_and_key(endpoint="flaky", model="m")
    bare_stack.upstream.script(Script(status=500))
    status, _, _ = await chat(bare_stack.http, url, key, HELLO)
    assert status == 502
    page = await browser.new_page()
    await page.goto(f"{url}/admin/#/workers")
    await page.get_by_label("Admin token").fill(TOKEN)
    await page.get_by_role("button", name="Sign in").click()
    await page.get_by_role("link", name="Workers").click()
    flaky = page.locator('#endpoint-rows tr[data-endpoint="flaky"]')
    await expect(flaky).to_contain_text("open")
    await expect(flaky.locator("td").nth(3)).to_contain_text(" s")
    echo = page.locator('#endpoint-rows tr[data-endpoint="echo"]')
    await expect(echo).to_contain_text("closed")
