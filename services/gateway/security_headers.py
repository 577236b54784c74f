"""Response headers that keep browsers and scanners from learning or doing too much.

Every response: ``Server: botline`` (aiohttp's default names its own and
Python's versions) and ``X-Content-Type-Options: nosniff``. Under ``/admin``:
a Content-Security-Policy with no inline script or style and no framing, and
no ``Referer`` sent on from the page.
"""

from __future__ import annotations

from aiohttp import web

SERVER = "botline"
ADMIN_CSP = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)
ADMIN_HEADERS = {
    "Content-Security-Policy": ADMIN_CSP,
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",  # frame-ancestors, for browsers that predate it
}


def server_headers(response: web.StreamResponse) -> None:
    """The headers every response carries, error answers made outside the app included."""
    response.headers["Server"] = SERVER
    response.headers["X-Content-Type-Options"] = "nosniff"


async def security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: the headers above (runs after aiohttp set its ``Server``)."""
    server_headers(response)
    if request.path == "/admin" or request.path.startswith("/admin/"):
        response.headers.update(ADMIN_HEADERS)
