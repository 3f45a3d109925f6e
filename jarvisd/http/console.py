"""``GET /console``: the approvals console, a page for the people who decide
(plain HTML, CSS and JavaScript shipped in the package: no build step, no
third-party host, it works offline on the host).

The page holds no authority of its own: it logs in with ``POST /auth/login``
and sends the session token it gets as a bearer header, kept in the tab's
sessionStorage. No cookie is ever set, so a request forged by another site
carries no credential (CSRF has nothing to ride on). The Content-Security-
Policy lets the page run only its own script and style, load nothing from
elsewhere, and be framed by nobody; everything an agent wrote is put on the
page as text, never as markup.
"""

from __future__ import annotations

import hashlib
import html
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources

from aiohttp import web

from jarvisd.http.errors import reject_unknown_params
from jarvisd.http.keys import RUNTIME

__all__ = ["CSP", "add_routes"]

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    # Revalidated on each load (ETag): a new release is never served stale.
    "Cache-Control": "no-cache",
}


@dataclass(frozen=True)
class _Asset:
    body: bytes
    content_type: str
    etag: str


def _asset(name: str, content_type: str, prefix: str | None = None) -> _Asset:
    body = (resources.files("jarvisd") / "console" / name).read_bytes()
    if prefix is not None:
        body = body.replace(b"__JARVISD_PREFIX__", html.escape(prefix, quote=True).encode())
    return _Asset(body, content_type, '"' + hashlib.sha256(body).hexdigest()[:32] + '"')


_static: dict[str, _Asset] = {}
_ID = re.compile(r"[0-9]{1,18}")  # ASCII digits only ("²".isdigit() is true)


def _serve(request: web.Request, asset: _Asset) -> web.Response:
    reject_unknown_params(request, ())
    if asset.etag in request.headers.get("If-None-Match", ""):
        return web.Response(status=304, headers={**_HEADERS, "ETag": asset.etag})
    return web.Response(
        body=asset.body,
        content_type=asset.content_type,
        charset="utf-8",
        headers={**_HEADERS, "ETag": asset.etag},
    )


async def page(request: web.Request) -> web.Response:
    prefix = request.app[RUNTIME].settings.redis.prefix
    key = f"index:{prefix}"
    if key not in _static:
        _static[key] = _asset("index.html", "text/html", prefix)
    return _serve(request, _static[key])


def _file(name: str, content_type: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(request: web.Request) -> web.Response:
        if name not in _static:
            _static[name] = _asset(name, content_type)
        return _serve(request, _static[name])

    return handler


async def approval_link(request: web.Request) -> web.Response:
    """``/console/approvals/{id}`` (a webhook's link, ``link_base`` ending in
    /console): the console, opened on that request."""
    raw = request.match_info["id"]
    if _ID.fullmatch(raw) is None:
        raise web.HTTPNotFound()
    raise web.HTTPSeeOther(f"/console#/approvals/{int(raw)}")


def add_routes(app: web.Application) -> None:
    app.router.add_get("/console", page)
    app.router.add_get("/console/", page)
    app.router.add_get("/console/console.js", _file("console.js", "text/javascript"))
    app.router.add_get("/console/console.css", _file("console.css", "text/css"))
    app.router.add_get("/console/approvals/{id}", approval_link)
