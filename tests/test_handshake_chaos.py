"""A ring port under strangers: connections that never finish their handshake cost a node
little memory, are closed after the handshake's deadline and leave generation exact; on an open
ring a stranger cannot take a node's name from another address."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import socket
import time
from pathlib import Path

import pytest

from mlxring import aio
from mlxring.config import load_config
from mlxring.protocol import codec as wire
from mlxring.protocol.messages import Hello
from mlxring.transport.conn import FrameConnection
from mlxring.transport.link import LinkSettings, handshake_connect

from .ringutil import (
    encode,
    local_ring,
    process_ring,
    reference,
    ring_tokens,
    tiny_model,
    write_config,
)

STRANGERS = 1200
SHARE = b"A" + os.urandom(32)  # a SPAKE2 message's size and side: the hello passes its checks
DEADLINE_S = 3.0  # LinkSettings.connect_timeout_s: the whole handshake


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def stranger(port: int, i: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection that starts a handshake, or not, and never finishes it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    if i % 3 == 1:  # a hello, then silence
        hello = Hello(wire.PROTOCOL_VERSION, "test", f"s{i}", os.urandom(16), pake=SHARE)
        writer.write(wire.encode_bytes(hello))
    elif i % 3 == 2:  # part of a frame, then silence
        writer.write(b"\x00\x00\x01\x00" + b"x" * 100)
    return reader, writer


async def closed(reader: asyncio.StreamReader) -> None:
    """Until the node closes the connection (a reset if it left bytes of ours unread)."""
    with contextlib.suppress(ConnectionResetError):
        while await reader.read(4096):
            pass


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmRSS from /proc")
def test_strangers_that_never_finish_the_handshake_cost_little_and_are_closed(
    tmp_path: Path,
) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want_fds = STRANGERS + 500
    if soft < want_fds:
        if hard != resource.RLIM_INFINITY and hard < want_fds:
            pytest.skip(f"{STRANGERS} connections need {want_fds} file descriptors; limit {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (want_fds, hard))
    model = tiny_model("qwen3")
    cfg = write_config(tmp_path, model, 2)
    prompt = encode(model, "Strangers knock while we generate.")
    want = reference(model, prompt, 32)
    port = load_config(cfg).node("n1").port

    async def run(pid: int) -> tuple[int, list[list[int]], float]:
        async with local_ring(cfg, ["n0"]) as rt:
            assert await ring_tokens(rt, prompt, 32) == want  # warm: the baseline has the model
            before = rss_bytes(pid)
            conns = []
            for start in range(0, STRANGERS, 100):  # within the listen backlog
                conns += await asyncio.gather(
                    *(stranger(port, i) for i in range(start, start + 100))
                )
            opened = time.monotonic()
            peak = before
            got = []
            for _ in range(3):  # generation goes on exactly while they hold on
                got.append(await ring_tokens(rt, prompt, 32))
                peak = max(peak, rss_bytes(pid))
            await asyncio.sleep(0.2)
            peak = max(peak, rss_bytes(pid))
            # Every one of them is closed by the node within the handshake's deadline.
            await aio.wait_for(
                asyncio.gather(*(closed(r) for r, _ in conns)),
                max(1.0, DEADLINE_S + 5 - (time.monotonic() - opened)),
            )
            closed_after = time.monotonic() - opened
            for _, w in conns:
                w.close()
            got.append(await ring_tokens(rt, prompt, 32))
            return peak - before, got, closed_after

    with process_ring(cfg, ["n1"], tmp_path) as procs:
        growth, got, closed_after = asyncio.run(run(procs["n1"].proc.pid))
        log = procs["n1"].log()
        alive = procs["n1"].proc.poll() is None
    assert alive and all(g == want for g in got)
    # 256 KiB each before: 300 MB; now a few KiB each, and only MAX_HANDSHAKING at once.
    assert growth < 24 * 1024 * 1024, f"RSS grew {growth / 2**20:.0f} MiB"
    assert closed_after <= DEADLINE_S + 5  # the deadline, and slack for a loaded machine
    assert '"peers_turned_away"' in log and '"peer_refused"' in log


def _loopback_aliases() -> None:
    for host in ("127.0.0.2", "127.0.0.3"):
        try:
            with socket.socket() as s:
                s.bind((host, 0))
        except OSError:
            pytest.skip(f"{host} is not an address of this machine")


def test_on_an_open_ring_a_stranger_cannot_pose_as_the_head(tmp_path: Path) -> None:
    """n0 (the head) at 127.0.0.2, n1 at 127.0.0.3, no secret: the ring forms and serves
    exactly; a stranger at 127.0.0.1 claiming to be n0 is refused; n1 says the ring is open."""
    _loopback_aliases()
    model = tiny_model("qwen3")
    cfg = write_config(tmp_path, model, 2, hosts=["127.0.0.2", "127.0.0.3"])
    prompt = encode(model, "Who is the head?")
    want = reference(model, prompt, 24)
    port = load_config(cfg).node("n1").port

    async def run() -> tuple[list[int], bool]:
        async with local_ring(cfg, ["n0"]) as rt:
            _, conn = await asyncio.get_running_loop().create_connection(
                FrameConnection, "127.0.0.3", port, local_addr=("127.0.0.1", 0)
            )
            refused = False
            try:
                await handshake_connect(conn, LinkSettings(cluster="test", node="n0"))
            except ConnectionError:
                refused = True
            finally:
                with contextlib.suppress(Exception):
                    await conn.wait_closed()
            return await ring_tokens(rt, prompt, 24), refused

    with process_ring(cfg, ["n1"], tmp_path) as procs:
        got, refused = asyncio.run(run())
        log = procs["n1"].log()
    assert got == want
    assert refused, "a stranger took the head's name"
    assert "claims to be 'n0' from 127.0.0.1" in log
    assert "the ring is open" in log
