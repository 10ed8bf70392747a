"""Forwarding to the head: a node without the engine sends API requests to the head's API.

`forward` relays the head's answer (a JSON body, or SSE event by event, whole events only);
`ask_head` GETs a small JSON document for /health and /cluster/status. A request the head itself
forwarded is refused, so two nodes that disagree on who the head is cannot loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import structlog
from aiohttp import web

from mlxring.api.errors import ApiError, unavailable
from mlxring.api.openai import SSE_DONE, SSE_HEADERS, sse
from mlxring.api.schema import read_body
from mlxring.api.state import RID, STATE, ApiState, note

log = structlog.get_logger()

FORWARDED = "X-Mlxring-Forwarded"  # set by a non-head node on the request it forwards
FORWARDED_RID = "X-Mlxring-Request-Id"  # the forwarding node's rid, for correlating logs
PROXY_CONNECT_S = 5.0
STATUS_TIMEOUT_S = 3.0  # /health and /cluster/status asked of the head
# The client's headers the head needs: its key (either way of sending it) and the body's type.
FORWARDED_HEADERS = ("Authorization", "X-Api-Key", "Content-Type")


@dataclass(frozen=True)
class StreamKind:
    """How a relayed SSE stream ends well, and how to end one the head cut short."""

    ends: tuple[bytes, ...]  # an event stream holding one of these has ended
    error: Callable[[ApiError], bytes]  # the events that end a stream with this error


OPENAI_STREAM = StreamKind((SSE_DONE,), lambda e: sse(e.body()) + SSE_DONE)


def head_url(state: ApiState, path_qs: str) -> str:
    addr = state.head_address()
    if addr is None:
        raise unavailable(f"the head {state.head_name} has no known address")
    host, port = addr
    return f"http://{host}:{port}{path_qs}"


async def forward(request: web.Request, kind: StreamKind = OPENAI_STREAM) -> web.StreamResponse:
    """Send this request to the head's API and relay its answer, SSE event by event (a stream
    of `kind`)."""
    state = request.app[STATE]
    if FORWARDED in request.headers:
        # The head forwarded to us: two nodes disagree on who the head is. Do not loop.
        raise unavailable(f"node {', '.join(state.names)} is not the head ({state.head_name})")
    body = await read_body(request, state.api)
    url = head_url(state, request.path_qs)
    headers = {k: v for k in FORWARDED_HEADERS if (v := request.headers.get(k))}
    headers[FORWARDED] = state.names[0]
    headers[FORWARDED_RID] = request[RID]
    note(request, forwarded_to=state.head_name)
    timeout = aiohttp.ClientTimeout(
        total=None,
        connect=PROXY_CONNECT_S,
        sock_connect=PROXY_CONNECT_S,
        # A token (or a queue slot) may take as long as a ring step may take.
        sock_read=state.request_timeout_s + 30,
    )
    assert state.session is not None
    try:
        upstream = await state.session.request(
            request.method, url, data=body, headers=headers, timeout=timeout
        )
    except (aiohttp.ClientError, TimeoutError) as e:
        raise unavailable(
            f"cannot reach the head {state.head_name} at {url}: {error_text(e)}"
        ) from None
    try:
        if upstream.content_type != "text/event-stream":
            try:
                data = await upstream.read()
            except (aiohttp.ClientError, TimeoutError) as e:
                raise unavailable(f"the head {state.head_name} failed: {error_text(e)}") from None
            keep = {k: v for k in ("Retry-After", "Allow") if (v := upstream.headers.get(k))}
            return web.Response(
                body=data,
                status=upstream.status,
                content_type=upstream.content_type,
                headers=keep,
            )
        return await _relay_sse(request, upstream, kind)
    finally:
        upstream.close()  # not release(): an unfinished stream must reach the head as a hang-up


async def _relay_sse(
    request: web.Request, upstream: aiohttp.ClientResponse, kind: StreamKind
) -> web.StreamResponse:
    state = request.app[STATE]
    resp = web.StreamResponse(
        status=upstream.status, headers={**SSE_HEADERS, "X-Request-Id": request[RID]}
    )
    await resp.prepare(request)
    buf = b""
    done = False
    try:
        try:
            async for chunk in upstream.content.iter_any():
                buf += chunk
                # Relay whole events only, so an error event can never splice into half a one.
                end = buf.rfind(b"\n\n")
                if end >= 0:
                    events, buf = buf[: end + 2], buf[end + 2 :]
                    done = done or any(end in events for end in kind.ends)
                    await resp.write(events)
        except (aiohttp.ClientError, TimeoutError) as e:
            log.warning("head_stream_failed", error=error_text(e))
        if not done:
            err = unavailable(f"the head {state.head_name} stopped answering mid-stream")
            await resp.write(kind.error(err))
        await resp.write_eof()
    except ConnectionError:
        log.info("client_disconnected")
    return resp


def error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


async def ask_head(state: ApiState, path: str) -> tuple[int, Any]:
    """GET a small JSON document from the head (status code, parsed body)."""
    assert state.session is not None
    url = head_url(state, path)
    headers = {FORWARDED: state.names[0]}
    if key := state.api.api_key:
        headers["Authorization"] = f"Bearer {key}"
    timeout = aiohttp.ClientTimeout(total=STATUS_TIMEOUT_S)
    async with state.session.get(url, headers=headers, timeout=timeout) as r:
        return r.status, await r.json(content_type=None)
