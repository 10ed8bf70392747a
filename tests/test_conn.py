"""A frame connection over a real socket: frames of every size in any split, why it stopped, and
reading that pauses while what it reads has nowhere to go (and loses nothing)."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable

import mlx.core as mx
import pytest

from mlxring import aio
from mlxring.protocol import codec as wire
from mlxring.protocol.messages import End, Forward, Tensor
from mlxring.transport.conn import (
    SMALL_RECV,
    ConnectionClosed,
    FrameConnection,
    FrameCutter,
    connect,
)


async def _frames_from(data: bytes, max_frame: int = wire.DEFAULT_MAX_FRAME) -> list[object]:
    """What a FrameConnection reads from a socket that sends `data` and closes: the frames,
    then the error the connection ended with."""
    got: list[object] = []
    done = asyncio.get_running_loop().create_future()

    def opened(conn: FrameConnection) -> None:
        async def read_all() -> None:
            while True:
                try:
                    got.append(await conn.read(5))
                except (wire.FrameError, ConnectionClosed) as e:
                    got.append(e)
                    done.set_result(None)
                    return

        asyncio.get_running_loop().create_task(read_all())

    server = await asyncio.get_running_loop().create_server(
        lambda: FrameConnection(max_frame, opened), "127.0.0.1", 0
    )
    port = server.sockets[0].getsockname()[1]
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    writer.close()
    await aio.wait_for(done, 5)
    server.close()
    return got


async def test_a_connection_reads_frames_and_says_why_it_stopped() -> None:
    end = wire.encode_bytes(End("r"))
    big = wire.encode_bytes(Forward("r", 1, (7,), True, h=mx.ones((1, 300, 512), mx.bfloat16)))
    # Small frames cut from one buffer, a large one received apart, in any split.
    got = await _frames_from(end + big + end + big)
    assert got[0] == End("r") and got[2] == End("r") and isinstance(got[4], ConnectionClosed)
    for f in (got[1], got[3]):
        assert isinstance(f, Forward) and isinstance(f.h, Tensor)
        assert mx.array_equal(wire.to_array(f.h), mx.ones((1, 300, 512), mx.bfloat16)).item()
    (e,) = await _frames_from(struct.pack(">I", 10_000) + b"x", max_frame=1000)
    assert isinstance(e, wire.FrameError) and "over the maximum" in str(e)
    for cut in (end[:-2], big[:-2]):
        got = await _frames_from(end + cut)
        assert got[0] == End("r") and "truncated" in str(got[1])
    (e,) = await _frames_from(struct.pack(">I", 0))
    assert isinstance(e, wire.FrameError) and "empty" in str(e)
    (e,) = await _frames_from(b"")
    assert isinstance(e, ConnectionClosed)


class Box:
    """An inflow of `room` messages: full until emptied."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.items: list[object] = []
        self.taken = 0
        self.peak = 0
        self._relief: list[Callable[[], None]] = []

    def put(self, msg: object) -> None:
        self.items.append(msg)
        self.taken += 1
        self.peak = max(self.peak, len(self.items))

    def wants_more(self) -> bool:
        return len(self.items) < self.room

    def when_relieved(self, resume: Callable[[], None]) -> None:
        self._relief.append(resume)

    def empty(self) -> list[object]:
        out, self.items = self.items, []
        relief, self._relief = self._relief, []
        for resume in relief:
            resume()
        return out


async def _pair(
    on_open: Callable[[FrameConnection], None],
) -> tuple[FrameConnection, asyncio.Server]:
    """A client connection to a FrameConnection server whose connections `on_open` sets up."""
    server = await asyncio.get_running_loop().create_server(
        lambda: FrameConnection(wire.DEFAULT_MAX_FRAME, on_open), "127.0.0.1", 0
    )
    port = server.sockets[0].getsockname()[1]
    return await connect("127.0.0.1", port, wire.DEFAULT_MAX_FRAME, 5), server


async def _until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_reading_pauses_while_the_inflow_is_full_and_loses_nothing() -> None:
    box = Box(room=100)
    served: list[FrameConnection] = []
    chunk = mx.ones((1, 16, 512), mx.bfloat16)  # 16 KiB a frame: 32 MiB outgrow every buffer

    def opened(conn: FrameConnection) -> None:
        served.append(conn)
        conn.deliver(box.put, box)

    client, server = await _pair(opened)
    n = 2000

    async def flood() -> None:
        for i in range(n):
            client.send(Forward(f"r{i}", 0, (1,), False, h=chunk))
            if client.buffered > 1 << 20:
                await client.drain()

    sending = asyncio.create_task(flood())
    await _until(lambda: bool(served) and served[0].reading_paused)
    conn = served[0]
    # Parsing stops at the frame that filled the box; the rest waits in the socket, and TCP
    # pushes back: the sender's writes queue up.
    await asyncio.sleep(0.3)
    assert box.peak == box.room and conn.pauses == 1
    await _until(lambda: client.buffered > 0)
    assert not sending.done()
    got: list[object] = []
    while len(got) < n:
        want = min(box.room, n - len(got))
        await _until(lambda: len(box.items) >= want)  # noqa: B023 - awaited here, in the loop
        got += box.empty()
    await aio.wait_for(sending, 10)
    assert [f.rid for f in got] == [f"r{i}" for i in range(n)]  # type: ignore[attr-defined]
    assert box.peak <= box.room and conn.pauses > 1 and not conn.reading_paused
    client.close()
    server.close()


async def test_frames_not_taken_pause_reading_until_read() -> None:
    served: list[FrameConnection] = []
    client, server = await _pair(served.append)
    n = 20_000
    for i in range(n):
        client.send(End(f"r{i}"))
    await client.drain()
    await _until(lambda: bool(served) and served[0].reading_paused)
    conn = served[0]
    await asyncio.sleep(0.2)
    assert len(conn._frames) == conn.max_queued  # the rest waits unparsed, or in the socket
    got = [await conn.read(5) for _ in range(n)]
    assert got == [End(f"r{i}") for i in range(n)]
    assert conn.pauses >= 1
    # The queue's hold lifts when a read finds nothing left to take (the last frames may have
    # filled the queue again): the next read waits for the socket, not paused.
    with pytest.raises(TimeoutError):
        await conn.read(0.05)
    assert not conn.reading_paused
    client.close()
    server.close()


def _cut_all(cutter: FrameCutter, data: bytes, step: int) -> list[bytes]:
    """Feed `data` to `cutter` as a socket would, at most `step` bytes a time; the bodies."""
    out: list[bytes] = []
    at = 0
    while at < len(data):
        buf = cutter.buffer()
        assert len(buf) > 0, "a cutter must always have room for the next bytes"
        n = min(len(buf), step, len(data) - at)
        buf[:n] = data[at : at + n]
        at += n
        big = cutter.received(n)
        if big is not None:
            out.append(bytes(big))
            big.release()
        elif not cutter.in_big:
            while (body := cutter.next()) is not None:
                out.append(body)
            cutter.compact()
    return out


def test_a_small_receive_buffer_takes_frames_of_any_size_and_grows_keeping_what_it_holds() -> None:
    """Before the handshake a connection's buffer is a few KiB: a frame that does not fit is
    received into its own buffer (up to the handshake's limit); growing keeps unparsed bytes."""
    sizes = [10, SMALL_RECV - 8, SMALL_RECV - 4, SMALL_RECV - 3, SMALL_RECV + 1, 60_000, 3]
    bodies = [bytes([i]) * n for i, n in enumerate(sizes)]
    stream = b"".join(struct.pack(">I", len(b)) + b for b in bodies)
    for step in (1, 7, 1000, SMALL_RECV, 100_000):
        cutter = FrameCutter(64 * 1024, recv=SMALL_RECV)
        assert _cut_all(cutter, stream, step) == bodies
    cutter = FrameCutter(64 * 1024, recv=SMALL_RECV)
    half = len(stream) // 2
    got = _cut_all(cutter, stream[:half], 999)
    cutter.grow(256 * 1024)
    got += _cut_all(cutter, stream[half:], 999)
    assert got == bodies
