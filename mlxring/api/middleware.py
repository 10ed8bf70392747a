"""The middleware every request passes: its id, the API key, errors as OpenAI bodies (as
Anthropic's under /v1/messages), and one log line and one metrics record per request. A CORS
preflight (any `OPTIONS`) is answered here, before the key is asked for: browsers send none
with it.

With an API key set, every endpoint needs it but `/health`, which then says only "ok" or
"unavailable" to a client without the key, and the web page's static files `/` and `/web/*`
(they hold no data, and the page must load to ask for the key). The key is sent as
`Authorization: Bearer KEY` (OpenAI's clients) or `x-api-key: KEY` (Anthropic's).
"""

from __future__ import annotations

import asyncio
import hmac
import re
import time
import uuid

import structlog
from aiohttp import web

from mlxring.api import anthropic
from mlxring.api.cors import preflight
from mlxring.api.errors import ApiError, http_error, internal_error
from mlxring.api.proxy import FORWARDED_RID
from mlxring.api.state import ARRIVED, AUTHORIZED, NOTES, RID, STATE, ApiState, Handler

log = structlog.get_logger()

_RID_OK = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# Routes served without the API key: the web page and its files hold no data, and /health
# answers such a client with its status word alone.
PUBLIC_ROUTES = frozenset({"web-index", "web-file", "health"})
# Successful GETs of these routes log at debug: the web page polls status every second.
QUIET_ROUTES = frozenset({"health", "cluster-status", "metrics", "web-index", "web-file"})


@web.middleware
async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    state = request.app[STATE]
    rid = uuid.uuid4().hex[:16]
    request[RID] = rid
    upstream = request.headers.get(FORWARDED_RID, "")
    t0 = time.perf_counter()
    request[ARRIVED] = time.monotonic()
    with structlog.contextvars.bound_contextvars(
        rid=rid, **({"via_rid": upstream} if _RID_OK.match(upstream) else {})
    ):
        resp: web.StreamResponse
        try:
            if request.method == "OPTIONS":  # a CORS preflight: no credentials, any path
                resp = preflight(request)
            else:
                _check_auth(request, state)
                resp = await handler(request)
        except ApiError as e:
            resp = _answer(request, e)
        except web.HTTPException as e:
            if e.status < 400:
                raise
            resp = _answer(request, http_error(e, request, state.api.max_body_bytes))
        except asyncio.CancelledError:
            # The client hung up (aiohttp cancels its handler); 499 as nginx logs it.
            _log_request(request, 499, t0)
            raise
        except Exception:  # never a traceback or a path in a body: details go to the log
            log.exception("request_failed", method=request.method, path=request.path)
            resp = _answer(request, internal_error())
        if not resp.prepared:
            resp.headers["X-Request-Id"] = rid
        _log_request(request, resp.status, t0)
        return resp


def _answer(request: web.Request, e: ApiError) -> web.Response:
    """The error in the shape of the API the request is for."""
    return anthropic.error_response(e) if anthropic.is_route(request) else e.response()


def _log_request(request: web.Request, status: int, t0: float) -> None:
    seconds = time.perf_counter() - t0
    notes = request.get(NOTES, {})
    route = request.match_info.route
    resource = route.resource
    endpoint = resource.canonical if resource is not None else "other"
    request.app[STATE].metrics.request_done(
        endpoint, request.method, status, seconds, notes.get("finish_reason")
    )
    quiet = status < 400 and route.name in QUIET_ROUTES
    (log.debug if quiet else log.info)(
        "http_request",
        method=request.method,
        path=request.path,
        status=status,
        ms=round(seconds * 1000, 1),
        **notes,
    )


def _check_auth(request: web.Request, state: ApiState) -> None:
    """Raise 401 for a request without the right key, but on a public route; note the outcome."""
    key = state.api.api_key
    request[AUTHORIZED] = True
    if not key:
        return
    scheme, _, bearer = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        bearer = ""
    given = [t.strip() for t in (bearer, request.headers.get("X-Api-Key", "")) if t.strip()]
    error: ApiError | None = None
    if not given:
        error = ApiError(
            401,
            "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY' or "
            "'x-api-key: YOUR_KEY'.",
            code="invalid_api_key",
        )
    elif not any(hmac.compare_digest(t.encode(), key.encode()) for t in given):
        error = ApiError(401, "Incorrect API key provided.", code="invalid_api_key")
    if error is None:
        return
    request[AUTHORIZED] = False
    if request.match_info.route.name not in PUBLIC_ROUTES:
        raise error
