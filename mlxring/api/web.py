"""The web page: `GET /` and its files under `/web/`, read from the package's `web` folder.

Only plain names with a known type are served; anything else is the same 404 as an unknown URL.
"""

from __future__ import annotations

import re
from importlib import resources

from aiohttp import web

from mlxring.api.errors import ApiError

WEB_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
}
_WEB_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}$")


def _web_response(name: str) -> web.Response:
    """A file of mlxring/web (package data): read per request, they are small and rarely asked."""
    suffix = name[name.rfind(".") :] if "." in name else ""
    path = resources.files("mlxring").joinpath("web", name)
    if not _WEB_NAME.match(name) or suffix not in WEB_TYPES or not path.is_file():
        raise ApiError(404, f"Invalid URL (GET /web/{name})", code="unknown_url")
    return web.Response(
        body=path.read_bytes(),
        headers={
            "Content-Type": WEB_TYPES[suffix],
            "Cache-Control": "no-cache",
            "X-Content-Type-Options": "nosniff",
        },
    )


async def web_index(request: web.Request) -> web.Response:
    return _web_response("index.html")


async def web_file(request: web.Request) -> web.Response:
    return _web_response(request.match_info["name"])
