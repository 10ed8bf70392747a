"""The HTTP API's connection limits against a real ring over raw sockets: slow-header
connections from one address neither starve another client nor outlive the head deadline, a
dripped body is answered 408 at its deadline, and connections past a cap are answered 503 in
OpenAI's shape and closed at once."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

from mlxring.aio import wait_for

from .ringutil import local_ring, post_completion, serve_api, tiny_model, write_valid_config

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


async def test_a_dripped_body_is_answered_408_at_its_deadline(tmp_path: Path) -> None:
    async with api(tmp_path, "body_timeout_s = 1") as port:
        body = json.dumps({"prompt": [1, 2, 3], "max_tokens": 2, "temperature": 0}).encode()
        reader, writer = await connect(port, "127.0.0.1")
        writer.write(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body)
        )
        t0 = time.monotonic()

        async def drip() -> None:
            # All of it would take len(body) / 5 s (about 9 s): a byte every 0.2 s, until just
            # before the deadline. A byte still coming in when the server closes makes its
            # kernel reset the connection, and the reset can discard the answer before this
            # side reads it (what a lingering close would spare a real client: not done).
            with contextlib.suppress(ConnectionError):
                for byte in body:
                    if time.monotonic() - t0 > 0.7:
                        break
                    writer.write(bytes([byte]))
                    await writer.drain()
                    await asyncio.sleep(0.2)

        dripping = asyncio.create_task(drip())
        try:
            raw = await closed_within(reader, 5)  # answered, then closed
        finally:
            dripping.cancel()
            writer.close()
        assert 0.8 < time.monotonic() - t0 < 3
        head, _, answer = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408"), raw
        error = json.loads(answer)["error"]
        assert error["code"] == "request_timeout" and "api.body_timeout_s" in error["message"]
        assert error["type"] == "invalid_request_error" and error["param"] is None
        # A body sent at once is read and answered as ever.
        status, completion = await asyncio.to_thread(post_completion, port, [1, 2, 3], 2)
        assert status == 200 and completion["usage"]["completion_tokens"] == 2, completion


def test_the_open_files_limit_is_raised_to_fit_the_caps() -> None:
    """A process started with macOS's default of 256 open files raises it for the API's caps."""
    import resource
    import subprocess
    import sys

    code = (
        "import resource\n"
        "from mlxring.api.limits import raise_fd_limit\n"
        "from mlxring.config import ApiConfig\n"
        "raise_fd_limit(ApiConfig(max_connections=1000))\n"
        "print(resource.getrlimit(resource.RLIMIT_NOFILE)[0])\n"
    )
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]

    def low() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))

    out = subprocess.run(
        [sys.executable, "-c", code], preexec_fn=low, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) == min(hard, 1000 + 256)


def first_bytes(s: socket.socket) -> bytes:
    try:
        return s.recv(64)
    except ConnectionResetError:  # refused and reset before the 503 was read
        return b""


def test_a_node_process_with_default_limits_outlasts_a_slow_header_flood(tmp_path: Path) -> None:
    """The attack as found: a flood of slow-header connections from one address against an
    `mlxring node` process (uvloop, default limits); another client is still answered."""
    from .ringutil import process_ring, write_config

    cfg = write_config(tmp_path, MODEL, 1)
    port = int(cfg.read_text().split("api_port = ")[1].split()[0])
    with process_ring(cfg, ["n0"], tmp_path) as procs:
        procs["n0"].wait_log("node_started")
        flood = []
        for _ in range(400):  # past the default 256 per client
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(PARTIAL_HEAD)
            flood.append(s)
        ok = socket.create_connection(
            ("127.0.0.1", port), timeout=5, source_address=("127.0.0.2", 0)
        )
        ok.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert ok.recv(64).startswith(b"HTTP/1.1 200")
        ok.close()
        refused = sum(1 for s in flood[256:] if first_bytes(s).startswith(b"HTTP/1.1 503"))
        assert refused > 100
        for s in flood:
            s.close()
