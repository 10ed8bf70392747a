"""Limits on the HTTP API's connections: a deadline for the request head, caps on open
connections in total and per client address, and the process's file-descriptor limit.

aiohttp closes a connection that sends no complete request within its keep-alive timeout of
opening or of the last response, but counts nothing: 2,100 connections that trickle their headers
used up the process's 2,048 file descriptors and every other client failed. Each accepted socket
here passes a `Gate` first: past a cap it is answered 503 (OpenAI's error shape) and closed at
once, before aiohttp sees it; within the caps its protocol is aiohttp's own, behind a thin
`_Guarded` wrapper that keeps the count and closes a connection whose first head is late.
"""

from __future__ import annotations

import asyncio
import json
import resource
from collections import Counter
from collections.abc import Callable
from typing import cast

import structlog
from aiohttp import web

from mlxring.config import ApiConfig

log = structlog.get_logger()

_HEAD_END = b"\r\n\r\n"
# File descriptors the process keeps beyond the HTTP caps: ring links, model files, logs.
FD_RESERVE = 256


def _refusal(message: str) -> bytes:
    body = json.dumps(
        {"error": {"message": message, "type": "server_error", "param": None, "code": None}}
    ).encode()
    head = (
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nRetry-After: 2\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


class Gate:
    """The open connections of one process's API servers, by client address."""

    def __init__(self, api: ApiConfig) -> None:
        self.api = api
        self.by_client: Counter[str] = Counter()
        self.total = 0
        self.refused = 0

    def admit(self, client: str) -> str | None:
        """Count a new connection from `client`; the reason it is refused, if it is."""
        if self.total >= self.api.max_connections:
            return f"The server has {self.total} open connections, its limit; retry shortly."
        if self.by_client[client] >= self.api.max_connections_per_client:
            return (
                f"Your address has {self.by_client[client]} open connections, the limit per "
                "client; close some and retry."
            )
        self.total += 1
        self.by_client[client] += 1
        return None

    def release(self, client: str) -> None:
        self.total -= 1
        self.by_client[client] -= 1
        if self.by_client[client] <= 0:
            del self.by_client[client]

    def factory(self, make: Callable[[], asyncio.BaseProtocol]) -> Callable[[], asyncio.Protocol]:
        """A protocol factory for `loop.create_server` around aiohttp's (`make`)."""
        return lambda: _Guarded(self, make)


class _Guarded(asyncio.Protocol):
    """aiohttp's protocol for one connection, created only once the gate admits it."""

    def __init__(self, gate: Gate, make: Callable[[], asyncio.BaseProtocol]) -> None:
        self.gate = gate
        self.make = make
        self.inner: asyncio.Protocol | None = None
        self.client = ""
        self.transport: asyncio.Transport | None = None
        self.head_timer: asyncio.TimerHandle | None = None
        self.tail = b""  # the last bytes seen while the first head is incomplete

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.client = str(peer[0]) if peer else "?"
        if reason := self.gate.admit(self.client):
            self.gate.refused += 1
            if self.gate.refused % 100 == 1:  # one line per 100 refusals: a flood logs little
                log.warning("api_connection_refused", client=self.client, reason=reason)
            self.transport.write(_refusal(reason))
            self.transport.close()
            return
        self.inner = cast(asyncio.Protocol, self.make())
        loop = asyncio.get_running_loop()
        self.head_timer = loop.call_later(self.gate.api.header_timeout_s, self._head_late)
        self.inner.connection_made(transport)

    def _head_late(self) -> None:
        self.head_timer = None
        log.info("api_header_timeout", client=self.client)
        if self.transport is not None:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        if self.inner is None:
            return
        if self.head_timer is not None:
            # The first head ends at a blank line; later heads are aiohttp's keep-alive timeout's.
            seen = self.tail + data
            if _HEAD_END in seen:
                self.head_timer.cancel()
                self.head_timer = None
            else:
                self.tail = seen[-3:]
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self.inner is not None else None

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None
        if self.inner is None:
            return
        self.gate.release(self.client)
        inner, self.inner = self.inner, None
        inner.connection_lost(exc)


class GatedSite(web.BaseSite):
    """aiohttp's TCPSite with every accepted connection passing `gate` first."""

    def __init__(self, runner: web.BaseRunner, gate: Gate, host: str, port: int) -> None:
        super().__init__(runner)
        self.gate = gate
        self.host = host
        self.port = port

    @property
    def name(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        loop = asyncio.get_running_loop()
        # Backlog as aiohttp's default; reuse_address as asyncio's default on Unix.
        self._server = await loop.create_server(
            self.gate.factory(server), self.host, self.port, backlog=128
        )


def raise_fd_limit(api: ApiConfig) -> None:
    """Raise the soft limit on open files to the hard limit, so the connection caps and the
    ring's own descriptors fit; warn when they do not."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = api.max_connections + FD_RESERVE
    if soft != resource.RLIM_INFINITY and soft < want:
        # Only as far as needed: macOS refuses an unlimited soft limit.
        new = want if hard == resource.RLIM_INFINITY else min(hard, want)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
        except (ValueError, OSError) as e:
            log.warning("fd_limit_not_raised", soft=soft, hard=hard, error=str(e))
    if soft != resource.RLIM_INFINITY and soft < want:
        log.warning(
            "fd_limit_low",
            limit=soft,
            needed=want,
            hint="lower api.max_connections or raise the open-files limit (ulimit -n)",
        )
