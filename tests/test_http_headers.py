"""Security headers (issue 10, item 12): a strict CSP on the admin page, no versions in Server."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import pytest
from playwright.async_api import Browser, async_playwright, expect

from services.gateway.routes import STATIC
from tests.support.stack import Stack
from tests.test_admin_page import CHROMIUM, CHROMIUM_FOUND, FLAGS

pytestmark = pytest.mark.integration

TOKEN = "headers-admin-token-1"


def csp_directives(header: str) -> dict[str, list[str]]:
    directives = {}
    for part in header.split(";"):
        words = part.split()
        if words:
            directives[words[0]] = words[1:]
    return directives


def test_the_admin_page_has_no_inline_script_or_style() -> None:
    page = (STATIC / "index.html").read_text()
    for tag in re.findall(r"<script\b[^>]*>", page):
        assert "src=" in tag, tag
    assert re.search(r"<script\b[^>]*>\s*[^<\s]", page) is None  # no script body
    assert "<style" not in page
    assert re.search(r"\sstyle=", page) is None
    assert re.search(r"\son[a-z]+=", page) is None  # no inline event handlers


async def test_admin_responses_carry_a_strict_csp(bare_stack: Stack) -> None:
    url = await bare_stack.add_gateway(admin_tokens=[TOKEN])
    for path, status in [
        ("/admin/", 200),
        ("/admin/static/admin.js", 200),
        ("/admin/static/admin.css", 200),
        ("/admin/api/bots", 401),
        ("/admin/api/openapi.json", 200),
        ("/admin/nowhere", 404),
    ]:
        async with bare_stack.http.get(url + path) as resp:
            assert resp.status == status, path
            csp = csp_directives(resp.headers["Content-Security-Policy"])
            assert csp["default-src"] == ["'self'"], path
            assert csp["frame-ancestors"] == ["'none'"], path
            for directive in ("script-src", "style-src"):
                assert csp[directive] == ["'self'"], (path, directive)
            assert "'unsafe-inline'" not in resp.headers["Content-Security-Policy"]
            assert resp.headers["X-Content-Type-Options"] == "nosniff", path
            assert resp.headers["Referrer-Policy"] == "no-referrer", path


async def test_no_response_names_aiohttp_or_python(bare_stack: Stack) -> None:
    url = await bare_stack.add_gateway(admin_tokens=[TOKEN])
    for method, path in [
        ("GET", "/livez"),
        ("GET", "/admin"),
        ("GET", "/admin/"),
        ("GET", "/nowhere"),
        ("POST", "/v1/chat/completions"),
        ("GET", "/openai/v1/models"),
        ("DELETE", "/livez"),
    ]:
        async with bare_stack.http.request(method, url + path, allow_redirects=False) as resp:
            server = resp.headers.get("Server", "")
            assert "aiohttp" not in server.lower(), (path, server)
            assert "python" not in server.lower(), (path, server)
            assert resp.headers["X-Content-Type-Options"] == "nosniff", path


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    assert CHROMIUM_FOUND, "browser tests need Debian's chromium"
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            yield launched
        finally:
            await launched.close()


async def test_the_page_works_under_its_csp(bare_stack: Stack, browser: Browser) -> None:
    url = await bare_stack.add_gateway(admin_tokens=[TOKEN])
    await bare_stack.registry.create_bot(name="CSP bot", endpoint="echo", model="m")
    page = await browser.new_page()
    violations: list[str] = []
    page.on(
        "console",
        lambda msg: violations.append(msg.text) if "Content Security Policy" in msg.text else None,
    )
    await page.goto(f"{url}/admin/")
    await page.get_by_label("Admin token").fill(TOKEN)
    await page.get_by_role("button", name="Sign in").click()
    await page.get_by_role("link", name="CSP bot").click()
    await expect(page.locator("#bot-title")).to_have_text("CSP bot")
    # The stylesheet applied: the page is styled, not raw HTML.
    assert await page.evaluate("document.styleSheets.length") >= 1
    assert violations == []
