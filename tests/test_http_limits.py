"""The HTTP API's connection limits against a real ring over raw sockets: slow-header
connections from one address neither starve another client nor outlive the head deadline, and
connections past a cap are answered 503 in OpenAI's shape and closed at once."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

from mlxring.aio import wait_for

from .ringutil import local_ring, serve_api, tiny_model, write_valid_config

MODEL = tiny_model("qwen3")
PARTIAL_HEAD = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Slow: "


async def connect(port: int, source: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))


async def request(port: int, source: str) -> tuple[int, dict[str, object]]:
    """GET /v1/models on a fresh connection from `source`; the status and the JSON body."""
    reader, writer = await connect(port, source)
    try:
        writer.write(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        raw = await wait_for(reader.read(), 5)
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bytes:
    """What the server sent before closing the connection; fails if it stays open."""
    with contextlib.suppress(ConnectionResetError):
        return await wait_for(reader.read(), seconds)
    return b""


@contextlib.asynccontextmanager
async def api(tmp_path: Path, limits: str) -> AsyncIterator[int]:
    cfg = write_valid_config(tmp_path, MODEL, 1, api=limits)
    async with local_ring(cfg) as rt, serve_api(rt):
        yield rt.config.api_port(rt.names[0])


async def test_slow_headers_from_one_address_leave_others_served(tmp_path: Path) -> None:
    limits = "header_timeout_s = 30\nmax_connections_per_client = 20\nmax_connections = 100"
    async with api(tmp_path, limits) as port:
        slow = [await connect(port, "127.0.0.1") for _ in range(60)]
        for _, w in slow:
            w.write(PARTIAL_HEAD)
        # The 40 past the per-client cap are answered 503 and closed at once.
        refused = 0
        for r, _ in slow[20:]:
            sent = await closed_within(r, 5)
            refused += sent.startswith(b"HTTP/1.1 503")
            if sent:
                body = json.loads(sent.partition(b"\r\n\r\n")[2])
                assert set(body["error"]) == {"message", "type", "param", "code"}
        assert refused >= 30  # a few may be reset before their 503 is read
        # Another address is served at once while the 20 slow ones still hold theirs.
        t0 = time.monotonic()
        status, body = await request(port, "127.0.0.2")
        assert status == 200 and body["object"] == "list"
        assert time.monotonic() - t0 < 2
        for _, w in slow:
            w.close()


async def test_total_cap_refuses_with_503(tmp_path: Path) -> None:
    limits = "max_connections_per_client = 10\nmax_connections = 15"
    async with api(tmp_path, limits) as port:
        held = [await connect(port, "127.0.0.1") for _ in range(10)]
        held += [await connect(port, "127.0.0.3") for _ in range(5)]
        await asyncio.sleep(0.2)  # the server accepts them
        status, body = await request(port, "127.0.0.2")
        assert status == 503 and body["error"]["type"] == "server_error"
        for _, w in held:
            w.close()
        await asyncio.sleep(0.2)
        status, _ = await request(port, "127.0.0.2")
        assert status == 200


async def test_slow_header_is_closed_after_the_deadline(tmp_path: Path) -> None:
    async with api(tmp_path, "header_timeout_s = 1") as port:
        reader, writer = await connect(port, "127.0.0.1")
        writer.write(PARTIAL_HEAD)
        t0 = time.monotonic()
        assert await closed_within(reader, 5) == b""
        assert 0.8 < time.monotonic() - t0 < 3
        writer.close()
        # A connection that sends its head in time is answered, and kept alive past the deadline.
        reader, writer = await connect(port, "127.0.0.1")
        for _ in range(2):
            writer.write(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
            line = await wait_for(reader.readline(), 5)
            assert line.startswith(b"HTTP/1.1 200"), line
            length = 0
            while (h := await reader.readline()) != b"\r\n":
                if h.lower().startswith(b"content-length:"):
                    length = int(h.split(b":")[1])
            await reader.readexactly(length)
            await asyncio.sleep(1.5)
        writer.close()
