"""CORS: which web pages' scripts may read the API's answers (`[api] allowed_origins`).

A browser asks first (a preflight `OPTIONS` with `Origin` and `Access-Control-Request-Method`)
and then reads an answer only if it says `Access-Control-Allow-Origin` for the page's origin.
`preflight` answers every `OPTIONS` with 204 (the middleware calls it, whatever the path);
`allow` adds the headers to every response as it is prepared (bodies, errors and streams).
An origin not allowed gets no CORS header at all, so the browser keeps the answer from the
page. `["*"]` (the default, as mlx-lm's `--allowed-origins`) allows every origin; credentials
are never allowed, so a page can reach an API with `api_key` set only with the key itself.
"""

from __future__ import annotations

from aiohttp import web

from mlxring.api.state import STATE

# Headers a page may send: what the OpenAI and Anthropic clients send, beside any it asks for.
ALLOW_HEADERS = ("Authorization", "Content-Type", "x-api-key", "anthropic-version")
ALLOW_METHODS = "GET, POST, OPTIONS"
MAX_AGE_S = 600  # how long a browser may keep a preflight's answer


def allowed_origin(allowed: tuple[str, ...], origin: str | None) -> str | None:
    """The value of Access-Control-Allow-Origin for a request from `origin`, or None."""
    if origin is None:
        return None
    if "*" in allowed:
        return "*"
    return origin if origin.lower() in allowed else None


def preflight(request: web.Request) -> web.Response:
    """204 for any OPTIONS: the CORS headers (if the origin is allowed) say the rest."""
    resp = web.Response(status=204, headers={"Allow": ALLOW_METHODS})
    if allowed_origin(request.app[STATE].api.allowed_origins, request.headers.get("Origin")):
        asked = request.headers.get("Access-Control-Request-Headers", "")
        names = [*ALLOW_HEADERS]
        lowered = {h.lower() for h in names}
        for h in (x.strip() for x in asked.split(",")):
            if h and h.lower() not in lowered:
                names.append(h)
                lowered.add(h.lower())
        resp.headers["Access-Control-Allow-Methods"] = ALLOW_METHODS
        resp.headers["Access-Control-Allow-Headers"] = ", ".join(names)
        resp.headers["Access-Control-Max-Age"] = str(MAX_AGE_S)
    return resp


async def allow(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: the origin's CORS header on every answer it may read."""
    value = allowed_origin(request.app[STATE].api.allowed_origins, request.headers.get("Origin"))
    if value is None:
        return
    response.headers["Access-Control-Allow-Origin"] = value
    # Answers differ by Origin unless every origin gets "*": caches must keep them apart.
    if value != "*":
        response.headers.add("Vary", "Origin")
    response.headers["Access-Control-Expose-Headers"] = "X-Request-Id, Retry-After"
